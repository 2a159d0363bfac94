"""`kanana-jax eval` end to end on a tiny checkpoint, checkpoint path resolution, prompts, confidences, and tool
episodes batched in lockstep through `run_episode` (checked with scripted replies that replay the references)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kanana_jax import config as config_lib
from kanana_jax.cli import main
from kanana_jax.config import ExperimentConfig, ModelConfig
from kanana_jax.data.tokenizer import ByteTokenizer
from kanana_jax.evals import runner, suites
from kanana_jax.generate.sampler import Completion
from kanana_jax.generate.tool_calls import ToolCall, render_assistant_turn
from kanana_jax.optim.factory import make_optimizer
from kanana_jax.train.checkpoint import Checkpointer
from kanana_jax.train.step import TrainState

MODEL = ModelConfig(vocab_size=320, d_model=64, n_layers=2, first_k_dense=1, d_ff=128, n_heads=4, kv_lora_rank=32,
                    qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=4, moe_d_ff=32,
                    top_k=2, moe_block_rows=8)


def _write_run(workdir, step=5, seed=0):
    """A run directory as `kanana-jax run` leaves it: config.json and an orbax TrainState checkpoint."""
    cfg = ExperimentConfig(model=MODEL)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(config_lib.to_dict(cfg), f)
    shapes = runner.abstract_params(cfg)
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda s: jnp.asarray(0.1 * rng.standard_normal(s.shape), s.dtype), shapes)
    optimizer, _ = make_optimizer(cfg.optimizer, cfg.train.steps)
    state = TrainState(step=jnp.int32(step), params=params, opt_state=optimizer.init(params))
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=2, async_save=False)
    ckpt.save(step, state, {"epoch": 0})
    ckpt.close()
    return params


def test_eval_cli_end_to_end_writes_accuracy_and_ece(tmp_path, capsys):
    workdir = str(tmp_path / "run")
    _write_run(workdir)
    out = str(tmp_path / "report.json")
    main(["eval", workdir, "--suite", "math,code,ifeval,tools", "--limit", "2", "--max-new-tokens", "8",
          "--max-turns", "2", "--output", out])
    printed = capsys.readouterr().out
    report = json.load(open(out))
    assert report["step"] == 5 and report["settings"]["chat_format"] == "plain"
    for name in suites.SUITE_NAMES:
        s = report["suites"][name]
        assert s["n"] == 2 and 0.0 <= s["accuracy"] <= 1.0
        assert s["ece"] is not None and 0.0 <= s["ece"] <= 1.0   # random replies state nothing: log-prob confidence
        assert s["n_with_confidence"] == 2 and s["confidence_sources"]["logprob"] == 2
        for item in s["items"]:
            assert 0.0 < item["confidence"] <= 1.0 and 1 <= item["n_tokens"] <= 8
            assert item["finish_reason"] in ("length", "stop_token", "stop_string")
        assert name in printed
    assert "accuracy" in printed and "ECE" in printed


def test_checkpoint_paths_resolve_and_params_restore(tmp_path):
    workdir = str(tmp_path / "run")
    params = _write_run(workdir, step=3)
    step_dir = os.path.join(workdir, "checkpoints", "3")
    for path in (workdir, step_dir, os.path.join(step_dir, "state")):
        loaded = runner.load_checkpoint(path)
        assert loaded.step == 3 and loaded.cfg.model == MODEL
        for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(params)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(FileNotFoundError, match="neither a run directory"):
        runner.resolve_checkpoint(str(tmp_path))
    os.remove(os.path.join(workdir, "config.json"))
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        runner.load_checkpoint(workdir)


def test_plain_chat_rendering_and_stops():
    fmt = runner.chat_format(ByteTokenizer())
    text = fmt.render([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?\n"}])
    assert text == "System: Be brief.\n\nUser: Hi?\n\nAssistant:"
    assert fmt.add_bos and "\nUser:" in fmt.stop_strings and fmt.stop_token_ids == (ByteTokenizer.eos_id,)
    ids = runner.prompt_ids(ByteTokenizer(), fmt, [{"role": "user", "content": "a"}])
    assert ids[0] == ByteTokenizer.bos_id and bytes(ids[1:]).decode() == "User: a\n\nAssistant:"


def _completion(text, logprobs=None):
    tokens = np.asarray(list(text.encode()), np.int32)
    lp = np.full(len(tokens), -0.1, np.float32) if logprobs is None else np.asarray(logprobs, np.float32)
    return Completion(tokens, lp, lp, "stop_token", text, 10)


def test_confidence_from_statement_or_answer_tokens():
    tok = ByteTokenizer()
    stated = _completion("The answer is \\boxed{42}.\nConfidence: 80%")
    assert runner.item_confidence("auto", "math", tok, stated) == (0.8, "stated")
    text = "so \\boxed{42}."
    lp = np.full(len(text), -0.01, np.float32)
    lp[text.index("42")] = -0.5   # the answer's two tokens: -0.5 and -0.3
    lp[text.index("42") + 1] = -0.3
    conf, src = runner.item_confidence("auto", "math", tok, _completion(text, lp))
    assert src == "logprob" and conf == pytest.approx(np.exp(-0.8), rel=1e-5)
    conf, src = runner.item_confidence("logprob", "ifeval", tok, _completion("hello", [-0.2, -0.4, 0, 0, -0.4]))
    assert conf == pytest.approx(np.exp(-0.2), rel=1e-5)
    assert runner.item_confidence("stated", "code", tok, _completion("no statement")) == (None, "none")


class _ReplayReferences:
    """Scripted 'model': the next reference step of the item whose prompt opens the conversation."""

    def __init__(self, items):
        self.by_prompt = {it["prompt"]: it for it in items}
        self.batches = []

    def __call__(self, conversations):
        self.batches.append(len(conversations))
        out = []
        for msgs in conversations:
            item = next(it for p, it in self.by_prompt.items() if msgs[1]["content"].startswith(p))
            step = item["reference"][sum(m["role"] == "assistant" for m in msgs)]
            calls = [ToolCall(c["name"], c["arguments"]) for c in step["calls"]]
            out.append(_completion(render_assistant_turn(step["content"], calls) + "\nConfidence: 90%"))
        return out


def test_tool_episodes_run_in_lockstep_batches_and_score_the_references():
    items = suites.load_suite("tools", limit=6)
    replay = _ReplayReferences(items)
    score, records = runner.evaluate_suite("tools", items, replay, ByteTokenizer())
    assert score.accuracy == 1.0, [r["details"] for r in records if not r["correct"]]
    assert replay.batches[0] == len(items)               # first turns of all episodes in one batch
    assert sum(replay.batches) == sum(len(it["reference"]) for it in items)
    assert score.ece == pytest.approx(0.1) and all(r["confidence_source"] == "stated" for r in records)


def test_hf_chat_template_next_to_the_tokenizer_is_used(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from kanana_jax.data.tokenizer import make_tokenizer
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(["hello world, what is two plus two?"] * 4, trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(tmp_path / "tokenizer.json"))
    template = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    json.dump({"chat_template": template, "bos_token": "<s>", "eos_token": {"content": "</s>"}},
              open(tmp_path / "tokenizer_config.json", "w"))
    hf = make_tokenizer(str(tmp_path / "tokenizer.json"))
    fmt = runner.chat_format(hf)
    assert fmt.name.startswith("template:") and not fmt.add_bos and fmt.stop_strings == ()
    assert set(fmt.stop_token_ids) == {tok.token_to_id("</s>"), tok.token_to_id("<|im_end|>")}
    text = fmt.render([{"role": "user", "content": "hello"}])
    assert text == "<s><|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    ids = runner.prompt_ids(hf, fmt, [{"role": "user", "content": "hello"}])
    assert ids[0] == tok.token_to_id("<s>") and ids[-3] != tok.token_to_id("<unk>")
