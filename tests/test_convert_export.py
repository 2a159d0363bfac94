"""`kanana-jax convert orbax-to-hf` of a run that used the byte tokenizer: the export carries a tokenizer (same ids
as ours, BOS first like our documents and prompts) and token ids, loads in transformers with AutoTokenizer +
AutoModelForCausalLM as it is (same logits as our model), and a second export into the same directory warns first."""
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf_reference import reference_outputs
from kanana_jax import cli
from kanana_jax import config as config_lib
from kanana_jax.config import ExperimentConfig, ModelConfig
from kanana_jax.data.tokenizer import ByteTokenizer, HFTokenizer
from kanana_jax.evals import runner
from kanana_jax.model import Transformer
from kanana_jax.optim.factory import make_optimizer
from kanana_jax.train.checkpoint import Checkpointer
from kanana_jax.train.step import TrainState

MODEL = ModelConfig(vocab_size=320, d_model=64, n_layers=2, first_k_dense=1, d_ff=128, n_heads=4, kv_lora_rank=32,
                    qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=4, moe_d_ff=32,
                    top_k=2, n_group=2, topk_group=1, moe_block_rows=8)
TEXTS = ["Kanana가 한국어와 English를 씁니다.", "x = 1 + 2\nprint(x)  # 3"]


def _write_run(workdir, step=3):
    cfg = ExperimentConfig(model=MODEL)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(config_lib.to_dict(cfg), f)
    shapes = runner.abstract_params(cfg)
    rng = np.random.default_rng(3)
    params = jax.tree.map(lambda s: jnp.asarray(0.2 * rng.standard_normal(s.shape), s.dtype), shapes)
    optimizer, _ = make_optimizer(cfg.optimizer, cfg.train.steps)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=2, async_save=False)
    ckpt.save(step, TrainState(step=jnp.int32(step), params=params, opt_state=optimizer.init(params)), {})
    ckpt.close()
    return params


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    base = tmp_path_factory.mktemp("export")
    params = _write_run(str(base / "run"))
    out = str(base / "hf")
    cli.main(["convert", "orbax-to-hf", str(base / "run"), out])
    return params, out


def test_the_export_carries_the_run_tokenizer_and_token_ids(export):
    _, out = export
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json", "config.json"} <= set(os.listdir(out))
    ours, theirs = ByteTokenizer(), HFTokenizer(os.path.join(out, "tokenizer.json"))
    assert (theirs.bos_id, theirs.eos_id, theirs.pad_id) == (257, 258, 256)
    for text in TEXTS:
        assert theirs.encode(text) == ours.encode(text) and theirs.decode(ours.encode(text)) == text
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (257, 258, 256)


def test_a_second_export_into_the_same_directory_warns_first(export, caplog):
    _, out = export
    with caplog.at_level(logging.WARNING, logger="kanana_jax.convert"):
        cli.main(["convert", "orbax-to-hf", os.path.join(os.path.dirname(out), "run"), out])
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"{out} already holds" in warning and "config.json" in warning and "overwriting" in warning


def test_the_export_loads_in_transformers_as_it_is(export):
    params, out = export
    result_dir = reference_outputs("convert_export", {"load": [{"name": "byte", "dir": out, "texts": TEXTS}]})
    with open(os.path.join(result_dir, "chat.json")) as f:
        loaded = json.load(f)["loads"]["byte"]
    ours = ByteTokenizer()
    assert loaded["bos_token"] == "<s>"
    assert loaded["ids"] == [[ours.bos_id] + ours.encode(t) for t in TEXTS]
    assert loaded["decoded"] == TEXTS and loaded["eos_token_id"] == ours.eos_id
    tokens = jnp.asarray([loaded["ids"][0]], jnp.int32)
    logits = np.asarray(Transformer(MODEL).apply({"params": params}, tokens))[0]
    np.testing.assert_allclose(np.load(os.path.join(result_dir, "load.logits.npy")), logits, rtol=0, atol=1e-4)
    assert loaded["generated"][:len(loaded["ids"][0])] == loaded["ids"][0] and len(loaded["generated"]) > len(
        loaded["ids"][0])
