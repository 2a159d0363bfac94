"""Reference side of the HF conversion tests, run by the Python 3.11 helper venv (torch CPU + transformers):

    .venv-hf/bin/python tests/hf_reference.py SPEC.json OUT_DIR

SPEC holds 'models' (tiny random DeepseekV3ForCausalLM configs to build, save with save_pretrained and run on
'tokens'), 'reload' (checkpoint dirs written by kanana_jax to load with from_pretrained and run), 'chat'
(conversations to render with apply_chat_template) and 'load' (one export directory loaded with AutoTokenizer +
AutoModelForCausalLM alone, as a user would). Writes OUT_DIR/<name>/ checkpoints, OUT_DIR/<name>.logits.npy,
OUT_DIR/<name>.reload.npy, OUT_DIR/load.logits.npy and OUT_DIR/chat.json.

transformers' DeepseekV3 only implements sigmoid scoring (noaux_tc). Models with "router": "softmax" get
their router replaced by a DeepSeek-V2-style softmax router written here (greedy or group-limited by the group
maximum, weights normalized if norm_topk_prob, then times routed_scaling_factor), so softmax parity is checked
against this reference, not against transformers itself.

The tests import this file (without torch) for `reference_outputs`, which runs it once per test run.
"""
import fcntl
import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile

try:  # only the helper venv has these; the tests import this file for `reference_outputs` without them
    import numpy as np
    import torch
    import torch.nn.functional as F
    import transformers
    from transformers import AutoTokenizer, DeepseekV3Config, DeepseekV3ForCausalLM
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as modeling
except ImportError:
    torch = None

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETUP_HINT = ("the transformers reference needs a Python 3.11 venv with torch==2.13.0 (CPU), transformers and "
              "safetensors: `launch/local.sh python -m pytest tests/test_convert_hf.py` builds it as .venv-hf, or "
              "point KANANA_HF_PYTHON at such a Python")


def hf_python() -> str:
    """The helper venv's Python: $KANANA_HF_PYTHON, else <repo>/.venv-hf/bin/python; RuntimeError if absent."""
    path = os.environ.get("KANANA_HF_PYTHON") or os.path.join(REPO, ".venv-hf", "bin", "python")
    if not os.path.isfile(path):
        raise RuntimeError(f"no helper Python at {path}: {SETUP_HINT}")
    return path


def run_reference(spec: dict, out_dir: str, timeout: int = 900):
    """Runs this file as a script in the helper venv on `spec`, writing into `out_dir`."""
    os.makedirs(out_dir, exist_ok=True)
    spec_path = os.path.join(out_dir, "spec.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([hf_python(), os.path.abspath(__file__), spec_path, out_dir], capture_output=True,
                          text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        hint = SETUP_HINT if "ModuleNotFoundError" in proc.stderr or "lacks torch" in proc.stderr else ""
        raise RuntimeError(f"tests/hf_reference.py failed (exit {proc.returncode}) in {hf_python()}: "
                           f"{proc.stderr[-3000:]}\n{hint}")


def reference_outputs(stage: str, spec: dict, prepare=None) -> str:
    """Directory of `run_reference(spec)` outputs, computed once per test run (shared by pytest-xdist workers
    through a lock file); `prepare(out_dir)` runs first under the same lock (e.g. to export checkpoints)."""
    run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID") or str(os.getpid())
    key = hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
    out_dir = os.path.join(tempfile.gettempdir(), f"kanana_hf_{run_id}", f"{stage}_{key}")
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    with open(out_dir + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not os.path.exists(os.path.join(out_dir, "done")):
                if prepare is not None:
                    prepare(out_dir)
                run_reference(spec, out_dir)
                with open(os.path.join(out_dir, "done"), "w"):
                    pass
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return out_dir


_SIGMOID_FORWARD = modeling.DeepseekV3TopkRouter.forward if torch is not None else None


def softmax_router_forward(self, hidden_states):
    """DeepSeek-V2-style router: softmax scores (+ bias for selection), group score = group maximum."""
    hidden_states = hidden_states.view(-1, self.hidden_dim)
    logits = F.linear(hidden_states.float(), self.weight.float())
    scores = logits.softmax(dim=-1)
    choice = scores + self.e_score_correction_bias
    if self.num_group > 1:
        grouped = choice.view(-1, self.num_group, self.num_experts // self.num_group)
        top_groups = grouped.amax(dim=-1).topk(self.topk_group, dim=-1)[1]
        mask = torch.zeros(grouped.shape[:2], dtype=torch.bool).scatter_(1, top_groups, True)
        choice = choice.masked_fill(~mask.repeat_interleave(self.num_experts // self.num_group, dim=1), -math.inf)
    topk_indices = choice.topk(self.top_k, dim=-1)[1]
    weights = scores.gather(1, topk_indices)
    if self.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return logits, weights * self.routed_scaling_factor, topk_indices


def use_router(kind: str):
    modeling.DeepseekV3TopkRouter.forward = softmax_router_forward if kind == "softmax" else _SIGMOID_FORWARD


def randomize(model, seed: int, bias: bool):
    """Every weight random (O(1) activations), norms around 1, routing bias in [0, 0.3) (zero if not `bias`)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith("embed_tokens.weight"):
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias") and bias:
                b.copy_(0.3 * torch.rand(b.shape, generator=gen))


def logits_of(model, tokens) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()


def build(spec: dict, tokens, out_dir: str):
    use_router(spec.get("router", "sigmoid"))
    config = DeepseekV3Config(**spec["config"])
    torch.manual_seed(spec.get("seed", 0))
    model = DeepseekV3ForCausalLM(config).eval()
    randomize(model, spec.get("seed", 0), spec.get("bias", True))
    if config.tie_word_embeddings:
        model.tie_weights()
    path = os.path.join(out_dir, spec["name"])
    model.save_pretrained(path, max_shard_size=spec.get("max_shard_size", "200KB"))
    np.save(os.path.join(out_dir, spec["name"] + ".logits.npy"), logits_of(model, tokens))


def reload(spec: dict, tokens, out_dir: str):
    use_router(spec.get("router", "sigmoid"))
    model = DeepseekV3ForCausalLM.from_pretrained(spec["dir"], dtype=torch.float32).eval()
    np.save(os.path.join(out_dir, spec["name"] + ".reload.npy"), logits_of(model, tokens))


def chat(spec: dict) -> dict:
    tok = AutoTokenizer.from_pretrained(spec["tokenizer_dir"])
    kw = dict(tools=spec.get("tools"), add_generation_prompt=spec.get("add_generation_prompt", False))
    text = tok.apply_chat_template(spec["messages"], tokenize=False, **kw)
    out = tok.apply_chat_template(spec["messages"], tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=spec.get("mask", True), **kw)
    return {"text": text, "input_ids": list(out["input_ids"]), "assistant_masks": list(out.get("assistant_masks", []))}


def load_as_is(spec: dict) -> dict:
    """An export loaded the way a user would: AutoTokenizer + AutoModelForCausalLM from the directory alone; the
    tokenizer's ids of `texts`, their decoding, and the model's logits and greedy continuation of the first."""
    tok = AutoTokenizer.from_pretrained(spec["dir"])
    model = transformers.AutoModelForCausalLM.from_pretrained(spec["dir"], dtype=torch.float32).eval()
    ids = [tok(t)["input_ids"] for t in spec["texts"]]
    with torch.no_grad():
        logits = model(torch.tensor([ids[0]])).logits.float().numpy()[0]
        generated = model.generate(torch.tensor([ids[0]]), max_new_tokens=3, do_sample=False)[0].tolist()
    np.save(os.path.join(spec["out"], "load.logits.npy"), logits)
    return {"ids": ids, "decoded": [tok.decode(i, skip_special_tokens=True) for i in ids], "generated": generated,
            "eos_token_id": model.generation_config.eos_token_id, "bos_token": tok.bos_token,
            "tokenizer_class": type(tok).__name__}


def main(spec_path: str, out_dir: str):
    with open(spec_path) as f:
        spec = json.load(f)
    os.makedirs(out_dir, exist_ok=True)
    tokens = spec.get("tokens")
    for model_spec in spec.get("models", []):
        build(model_spec, tokens, out_dir)
    for reload_spec in spec.get("reload", []):
        reload(reload_spec, tokens, out_dir)
    chats = {c["name"]: chat(c) for c in spec.get("chat", [])}
    loads = {c["name"]: load_as_is({**c, "out": out_dir}) for c in spec.get("load", [])}
    with open(os.path.join(out_dir, "chat.json"), "w") as f:
        json.dump({"chats": chats, "loads": loads, "torch": torch.__version__,
                   "transformers": transformers.__version__}, f)


if __name__ == "__main__":
    if torch is None:
        sys.exit(f"{sys.executable} lacks torch/transformers: {SETUP_HINT}")
    main(*sys.argv[1:3])
