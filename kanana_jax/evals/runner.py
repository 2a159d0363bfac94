"""Evaluate a training checkpoint on the embedded suites: load params, render prompts, generate with the KV-cached
sampler, run tool episodes in the real tool environment, score, and report accuracy and ECE per suite.

Checkpoints: WORKDIR (latest step), WORKDIR/checkpoints/<step> or WORKDIR/checkpoints/<step>/state, with the
run's validated config at WORKDIR/config.json. Only the parameters are read (orbax partial restore).
Prompts: the tokenizer's HF chat template when a `tokenizer_config.json` with `chat_template` sits next to
`data.tokenizer`, else a plain 'Role: text' rendering (BOS first) that ends with 'Assistant:'.
Confidence per item: 'stated' ('Confidence: NN%' in the answer), 'logprob' (exp of the summed log-prob of the
extracted math answer's tokens; exp of the mean token log-prob of the reply for other suites), or 'auto'
(stated when present, else logprob).
"""
from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from typing import Any, Callable, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from kanana_jax import config as config_lib
from kanana_jax import sharding as sharding_lib
from kanana_jax.data.tokenizer import make_tokenizer
from kanana_jax.evals import scoring, suites
from kanana_jax.evals.calibration import parse_stated_confidence
from kanana_jax.generate.sampler import Completion, Sampler, SamplingParams
from kanana_jax.model import Transformer
from kanana_jax.rewards.math import extract_answer
from kanana_jax.rewards.tools import ToolEnv, run_episode

CONFIDENCE_MODES = ("auto", "stated", "logprob")
TABLE_LEGEND = ("ECE: expected calibration error (10 equal-width bins) over the items that have a confidence; "
                "conf: how many items have one\n(a stated 'Confidence: NN%' in the reply, else the log-probability "
                "of the answer; --confidence chooses; the report JSON has the split per suite)")
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end_of_turn|>", "<end_of_turn>", "<|endofturn|>")


@dataclasses.dataclass(frozen=True)
class LoadedCheckpoint:
    cfg: config_lib.ExperimentConfig
    params: Any
    step: int
    workdir: str
    state_dir: str


def resolve_checkpoint(path: str) -> tuple[str, str, int]:
    """(workdir, step's 'state' dir, step) for WORKDIR, WORKDIR/checkpoints/<step> or .../<step>/state."""
    path = os.path.abspath(path)
    if os.path.basename(path) == "state":
        path = os.path.dirname(path)
    if os.path.isdir(os.path.join(path, "checkpoints")):
        ckpt_root = os.path.join(path, "checkpoints")
        steps = sorted(int(d) for d in os.listdir(ckpt_root)
                       if d.isdigit() and os.path.isdir(os.path.join(ckpt_root, d, "state")))
        if not steps:
            raise FileNotFoundError(f"no committed checkpoint (checkpoints/<step>/state) under {ckpt_root}")
        return path, os.path.join(ckpt_root, str(steps[-1]), "state"), steps[-1]
    if os.path.basename(path).isdigit() and os.path.isdir(os.path.join(path, "state")):
        return os.path.dirname(os.path.dirname(path)), os.path.join(path, "state"), int(os.path.basename(path))
    raise FileNotFoundError(f"{path} is neither a run directory (with checkpoints/) nor a checkpoint step "
                            "directory (checkpoints/<step> holding state/); pass one of those")


def load_config(workdir: str) -> config_lib.ExperimentConfig:
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing; `kanana-jax run` writes it into the run directory, and eval "
                                "needs it to rebuild the model")
    return config_lib.read_run_config(path)


def abstract_params(cfg: config_lib.ExperimentConfig, mesh=None, rules=None):
    """ShapeDtypeStructs of the model's parameters (with the training shardings on `mesh`)."""
    boxed = jax.eval_shape(lambda: Transformer(cfg.model).init(jax.random.PRNGKey(0),
                                                               jnp.zeros((1, 1), jnp.int32))["params"])
    shapes = flax.linen.unbox(boxed)
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), shapes)
    shardings = sharding_lib.param_shardings(boxed, mesh, rules)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def load_checkpoint(path: str, mesh=None, rules=None) -> LoadedCheckpoint:
    """Config and parameters (only) of a checkpoint; see `resolve_checkpoint` for accepted paths."""
    import orbax.checkpoint as ocp
    workdir, state_dir, step = resolve_checkpoint(path)
    cfg = load_config(workdir)
    target = {"params": abstract_params(cfg, mesh, rules)}
    try:
        restored = ocp.PyTreeCheckpointer().restore(state_dir, args=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))
    except Exception as e:  # orbax reports missing / mismatched leaves with many exception types
        raise RuntimeError(f"cannot restore the parameters of {state_dir} for the model in {workdir}/config.json: "
                           f"{type(e).__name__}: {str(e)[:500]}") from e
    return LoadedCheckpoint(cfg, restored["params"], step, workdir, state_dir)


@dataclasses.dataclass(frozen=True)
class ChatFormat:
    """Turns chat messages into prompt text; the stops that end an assistant turn."""
    render: Callable[[list[dict]], str]
    add_bos: bool
    stop_strings: tuple[str, ...]
    stop_token_ids: tuple[int, ...]
    name: str


_PLAIN_ROLES = {"system": "System", "user": "User", "assistant": "Assistant", "tool": "Tool"}


def render_plain(messages: Sequence[dict]) -> str:
    """'System: ...\\n\\nUser: ...\\n\\nAssistant:' (tool results as 'Tool:' turns), for models without a template."""
    parts = []
    for m in messages:
        if m["role"] not in _PLAIN_ROLES:
            raise ValueError(f"unknown message role {m['role']!r}; expected one of {sorted(_PLAIN_ROLES)}")
        parts.append(f"{_PLAIN_ROLES[m['role']]}: {m['content'].strip()}")
    return "\n\n".join(parts) + "\n\nAssistant:"


def _special_id(tokenizer, text: str) -> int | None:
    """The id of `text` when the tokenizer has it as one special token (decodes to nothing), else None."""
    ids = tokenizer.encode(text)
    return ids[0] if len(ids) == 1 and tokenizer.decode(ids) == "" else None


def chat_format(tokenizer) -> ChatFormat:
    """The HF chat template next to an HF tokenizer.json if there is one, else the plain rendering."""
    stop_ids = tuple(sorted({tokenizer.eos_id} | {i for t in _END_OF_TURN_TOKENS
                                                  if (i := _special_id(tokenizer, t)) is not None}))
    spec = getattr(tokenizer, "spec", "byte")
    config_path = os.path.join(os.path.dirname(os.path.abspath(spec)), "tokenizer_config.json")
    template = None
    if spec != "byte" and os.path.isfile(config_path):
        with open(config_path) as f:
            template = json.load(f).get("chat_template")
        if isinstance(template, list):  # [{'name': 'default', 'template': ...}, ...]
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default") or next(iter(named.values()), None)
    if not template:
        plain_stops = tuple(f"\n{r}:" for r in _PLAIN_ROLES.values())
        return ChatFormat(render_plain, True, plain_stops, stop_ids, "plain")
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    compiled = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(template)
    with open(config_path) as f:
        tok_cfg = json.load(f)
    special = {k: (v.get("content") if isinstance(v, dict) else v) or ""
               for k, v in tok_cfg.items() if k in ("bos_token", "eos_token")}

    def render(messages):
        return compiled.render(messages=list(messages), add_generation_prompt=True, **special)

    return ChatFormat(render, False, (), stop_ids, f"template:{config_path}")


def prompt_ids(tokenizer, fmt: ChatFormat, messages: Sequence[dict]) -> list[int]:
    ids = tokenizer.encode(fmt.render(list(messages)))
    return ([tokenizer.bos_id] if fmt.add_bos else []) + list(ids)


def answer_span_confidence(tokenizer, completion: Completion, answer: str | None) -> float | None:
    """exp(sum of log-probs) of the tokens covering the last occurrence of `answer` in the completion text."""
    text = completion.text or ""
    if not answer or answer not in text:
        return None
    start = text.rindex(answer)
    end = start + len(answer)
    offsets = [len(tokenizer.decode(completion.tokens[:k])) for k in range(len(completion.tokens) + 1)]
    picked = [lp for k, lp in enumerate(completion.logprobs) if offsets[k + 1] > start and offsets[k] < end]
    return float(np.exp(np.sum(picked))) if picked else None


def mean_token_confidence(completion: Completion) -> float | None:
    """exp(mean token log-prob) of a completion: the per-token geometric-mean probability."""
    if len(completion.logprobs) == 0:
        return None
    return float(np.exp(np.mean(completion.logprobs)))


def item_confidence(mode: str, suite: str, tokenizer, completion: Completion) -> tuple[float | None, str]:
    """(confidence, 'stated' | 'logprob' | 'none') for one item's final reply under `mode`."""
    if mode not in CONFIDENCE_MODES:
        raise ValueError(f"confidence mode {mode!r}; choose from {CONFIDENCE_MODES}")
    text = completion.text or ""
    if mode in ("auto", "stated"):
        stated = parse_stated_confidence(text)
        if stated is not None or mode == "stated":
            return stated, "stated" if stated is not None else "none"
    conf = None
    if suite == "math":
        conf = answer_span_confidence(tokenizer, completion, extract_answer(text))
    if conf is None:
        conf = mean_token_confidence(completion)
    return (min(max(conf, 0.0), 1.0), "logprob") if conf is not None else (None, "none")


class Generator:
    """Batched chat generation: messages -> Completion (reply text stripped), `batch_size` conversations at a time."""

    def __init__(self, sampler: Sampler, tokenizer, fmt: ChatFormat, sampling: SamplingParams, key,
                 batch_size: int):
        self.sampler, self.tokenizer, self.fmt, self.key, self.batch_size = sampler, tokenizer, fmt, key, batch_size
        self.sampling = dataclasses.replace(
            sampling, stop_strings=tuple(dict.fromkeys(sampling.stop_strings + fmt.stop_strings)),
            stop_token_ids=tuple(dict.fromkeys(sampling.stop_token_ids + fmt.stop_token_ids)))
        self.calls = 0

    def __call__(self, conversations: Sequence[Sequence[dict]]) -> list[Completion]:
        out = []
        for lo in range(0, len(conversations), self.batch_size):
            prompts = [prompt_ids(self.tokenizer, self.fmt, c) for c in conversations[lo:lo + self.batch_size]]
            key = jax.random.fold_in(self.key, self.calls)
            self.calls += 1
            out += [dataclasses.replace(c, text=(c.text or "").strip())
                    for c in self.sampler.generate(prompts, self.sampling, key)]
        return out


class _Lockstep:
    """Lets several `run_episode` threads share batched generation: a batch runs once every live episode waits
    on a reply, in episode order (so results do not depend on thread timing)."""

    def __init__(self, generate_batch: Callable[[list], list], n_episodes: int):
        self._cv, self._generate = threading.Condition(), generate_batch
        self._alive, self._pending, self._results, self._error = n_episodes, {}, {}, None

    def _flush_if_ready(self):
        if not self._pending or len(self._pending) < self._alive:
            return
        batch = sorted(self._pending.items())
        self._pending.clear()
        try:
            self._results.update(zip([i for i, _ in batch], self._generate([m for _, m in batch])))
        except BaseException as e:  # handed to every waiting episode
            self._error = e
        self._cv.notify_all()

    def generate(self, index: int, messages: list[dict]):
        with self._cv:
            self._pending[index] = list(messages)
            self._flush_if_ready()
            while index not in self._results and self._error is None:
                self._cv.wait()
            if self._error is not None:
                raise self._error
            return self._results.pop(index)

    def finish(self):
        with self._cv:
            self._alive -= 1
            self._flush_if_ready()


def run_tool_episodes(items: Sequence[dict], generator: Generator, max_turns: int):
    """(assistant turns per item, last reply's Completion per item) from `run_episode` in the real tool env."""
    last: dict[int, Completion] = {}
    lockstep = _Lockstep(generator, len(items))
    turns: list = [None] * len(items)
    errors: list = []

    def worker(i: int):
        try:
            def generate(messages):
                last[i] = lockstep.generate(i, messages)
                return last[i].text
            env = ToolEnv(items[i]["tools"], items[i]["initial_state"])
            _, turns[i] = run_episode(env, suites.build_messages("tools", items[i]), generate, max_turns)
        except BaseException as e:  # re-raised in the caller's thread
            errors.append(e)
        finally:
            lockstep.finish()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(len(items))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return turns, [last[i] for i in range(len(items))]


def evaluate_suite(name: str, items: Sequence[dict], generator: Generator, tokenizer, *, confidence: str = "auto",
                   max_turns: int = 4, ask_confidence: bool = True):
    """(SuiteScore, per-item records) for one suite."""
    if name == "tools":
        responses, finals = run_tool_episodes(items, generator, max_turns)
    else:
        finals = generator([suites.build_messages(name, it, ask_confidence=ask_confidence) for it in items])
        responses = [c.text for c in finals]
    confs = [item_confidence(confidence, name, tokenizer, c) for c in finals]
    score = scoring.score_suite(name, items, responses, [c for c, _ in confs])
    records = [{"id": s.id, "correct": s.correct, "confidence": s.confidence, "confidence_source": src,
                "details": s.details, "finish_reason": c.finish_reason, "n_tokens": int(len(c.tokens)),
                "response": r if isinstance(r, str) else list(r)}
               for s, (_, src), c, r in zip(score.items, confs, finals, responses)]
    return score, records


def run_eval(checkpoint: str, suite_names: Sequence[str], *, limit: int | None = None, lang: str | None = None,
             sampling: SamplingParams = SamplingParams(max_new_tokens=512, temperature=0.0), seed: int = 0,
             batch_size: int = 16, confidence: str = "auto", max_turns: int = 4, ask_confidence: bool = True,
             min_prompt_bucket: int = 16,
             log: Callable[[str], None] = lambda message: print(message, flush=True)) -> dict:
    """Loads `checkpoint`, evaluates each suite, and returns the JSON-able report (see module docstring). Prompts
    are left-padded to a power of two >= `min_prompt_bucket` tokens (one sampler compile per width)."""
    workdir, _, _ = resolve_checkpoint(checkpoint)
    cfg = load_config(workdir)
    mesh = rules = None
    if jax.device_count() > 1:
        mesh, rules = sharding_lib.make_mesh(cfg.mesh), sharding_lib.logical_rules(cfg.mesh.rules)
    loaded = load_checkpoint(checkpoint, mesh, rules)
    tokenizer = make_tokenizer(cfg.data.tokenizer)
    fmt = chat_format(tokenizer)
    sampler = Sampler(cfg.model, loaded.params, tokenizer=tokenizer, mesh=mesh, rules=rules,
                      min_prompt_bucket=min_prompt_bucket)
    generator = Generator(sampler, tokenizer, fmt, sampling, jax.random.PRNGKey(seed), batch_size)
    log(f"eval of {loaded.state_dir} (step {loaded.step}); prompts: {fmt.name}; suites: {', '.join(suite_names)}")
    scores, report = [], {}
    for k, name in enumerate(suite_names, 1):
        items = suites.load_suite(name, lang=lang, limit=limit)
        start = time.perf_counter()
        log(f"[{k}/{len(suite_names)}] {name}: {len(items)} items, up to {sampling.max_new_tokens} new tokens each"
            + (f", up to {max_turns} turns" if name == "tools" else "")
            + (" (the first batch compiles the sampler)" if k == 1 else "") + "…")
        score, records = evaluate_suite(name, items, generator, tokenizer, confidence=confidence,
                                        max_turns=max_turns, ask_confidence=ask_confidence)
        scores.append(score)
        sources = {s: sum(r["confidence_source"] == s for r in records) for s in ("stated", "logprob", "none")}
        report[name] = {**score.summary(), "confidence_sources": sources, "items": records}
        log(f"[{k}/{len(suite_names)}] {name}: accuracy {score.accuracy:.3f} over {score.n} items "
            f"({time.perf_counter() - start:.1f} s)")
    table = scoring.format_report(scores) + "\n" + TABLE_LEGEND
    return {"checkpoint": loaded.state_dir, "workdir": loaded.workdir, "step": loaded.step,
            "settings": {"suites": list(suite_names), "limit": limit, "lang": lang, "seed": seed,
                         "confidence": confidence, "max_turns": max_turns, "chat_format": fmt.name,
                         "sampling": dataclasses.asdict(generator.sampling), "batch_size": batch_size},
            "suites": report, "table": table}
