"""fp8 in training: the `precision` config section (combinations that cannot work fail at load, naming the key),
the stage models built from it, and delayed scaling's amax histories in the train state (TrainState.model_state):
updated by the step outside the optimizer, combined over microbatches by max, kept on a skipped non-finite step,
and, through loop.run, a tiny fp8 run that trains, checkpoints and resumes bit-exact with its scaling state."""
import json
import os
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from kanana_jax import config as config_lib
from kanana_jax.cli import build_config
from kanana_jax.model import fp8
from kanana_jax.train import loop
from kanana_jax.train import step as step_lib
from kanana_jax.train.stages import get_stage
from pallas_kernels import fp8 as fp8_lib

SPEC = "experiments/pretrain.py:size=tiny,steps={steps},batch=8,seq_len=32"
FP8_DELAYED = ["precision.matmul=fp8", "precision.fp8_scaling=delayed", "precision.fp8_amax_history=4"]
# a narrower tiny model, one MoE layer, not scanned: the run's cost is compiling the step (a scanned stack of two
# layers takes 1.5x as long; the layer axis of scanned histories: test_summary_metrics_and_per_layer_histograms)
NARROW = ["model.n_layers=1", "model.first_k_dense=0", "model.scan_layers=false", "model.d_model=64", "model.n_heads=2", "model.d_ff=128", "model.moe_d_ff=64",
          "model.n_routed_experts=4", "model.kv_lora_rank=32", "model.qk_nope_head_dim=16",
          "model.qk_rope_head_dim=8", "model.v_head_dim=16", "model.dtype=bfloat16"]


def _cfg(steps, extra=()):
    _, cfg = build_config(SPEC.format(steps=steps),
                          ["train.log_every=1", "train.progress_bar=false", "train.tensorboard=false",
                           "train.eval_every=0", *extra])
    return cfg


@pytest.mark.parametrize("overrides, message", [
    (["precision.matmul=fp16"], "'precision.matmul': 'fp16' is not allowed; allowed values: 'bf16', 'fp8'"),
    (["precision.fp8_grad_dtype=e3m4"], "'precision.fp8_grad_dtype': 'e3m4' is not allowed; allowed values: "
                                        "'e4m3', 'e5m2'"),
    (["precision.fp8_scaling=delayed"], "'precision.fp8_scaling': 'delayed' acts only with precision.matmul='fp8'"),
    (["precision.fp8_lm_head=true"], "'precision.fp8_lm_head': True acts only with precision.matmul='fp8'"),
    (["precision.fp8_prequantize=false"],
     "'precision.fp8_prequantize': False acts only with precision.matmul='fp8'"),
    (["precision.fp8_expert_wgrad=true"],
     "'precision.fp8_expert_wgrad': True acts only with precision.matmul='fp8'"),
    (["precision.matmul=fp8", "precision.fp8_amax_history=8"],
     "'precision.fp8_amax_history': 8 acts only with precision.fp8_scaling='delayed'"),
    (["precision.matmul=fp8", "precision.fp8_scaling=delayed", "precision.fp8_amax_history=0"],
     "'precision.fp8_amax_history': 0 is below the minimum 1"),
    (["precision.matmul=fp8", "model.moe_impl=ragged_dot"],
     "'model.moe_impl': 'ragged_dot' cannot run precision.matmul='fp8'"),
    (["precision.matmul=fp8", "precision.fp8_lm_head=true", "model.tie_embeddings=true"],
     "'precision.fp8_lm_head': True needs an untied LM head"),
    (["precision.matmul=fp8", "precision.fp8_lm_head=true", "train.stage=reward_model"],
     "'precision.fp8_lm_head': True has no effect with train.stage='reward_model'"),
])
def test_precision_combinations_that_cannot_work_fail_at_load(overrides, message):
    with pytest.raises(config_lib.ConfigError) as e:
        _cfg(2, overrides)
    assert message in str(e.value)


def test_stage_models_take_the_recipe_and_fp8_on_an_old_gpu_is_refused_at_build(monkeypatch):
    cfg = _cfg(2, [*FP8_DELAYED, "precision.fp8_grad_dtype=e4m3", "precision.fp8_lm_head=true"])
    assert get_stage("pretrain").make_model(cfg).fp8 == fp8.Fp8Recipe("e4m3", "delayed", 4, lm_head=True)
    assert get_stage("sft").make_model(cfg).fp8 is not None
    assert get_stage("pretrain").make_model(_cfg(2)).fp8 is None
    rm_cfg = _cfg(2, [*FP8_DELAYED, "train.stage=reward_model"])
    assert get_stage("reward_model").make_model(rm_cfg).fp8 == fp8.Fp8Recipe(scaling="delayed", amax_history=4)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax, "devices", lambda *a: [types.SimpleNamespace(compute_capability="8.0",
                                                                         device_kind="NVIDIA A100")])
    with pytest.raises(ValueError, match="precision.matmul='fp8' needs an fp8 tensor-core GPU"):
        get_stage("pretrain").make_model(cfg)


# ---- the step with a one-projection model: histories outside the optimizer, max over microbatches, skip --------

class _Projection(nn.Module):
    recipe: fp8.Fp8Recipe

    @nn.compact
    def __call__(self, x_BxK):
        w = self.param("w", nn.initializers.normal(0.1), (x_BxK.shape[-1], 8), jnp.float32)
        history = fp8.history_variable(self, "w", self.recipe)
        return fp8.project(x_BxK, w, jnp.float32, self.recipe, "bk,kn->bn", history_var=history)


def _loss_fn(model, params, extra, batch, cfg, rng):  # dL/dy = batch['g']: the g amax is known
    y = model.apply({"params": params}, batch["x"])
    return jnp.sum(y * batch["g"]), {"metrics": {}, "intermediates": {}}


def _eval_fn(model, params, extra, batch, cfg):
    return {"y": model.apply({"params": params}, batch["x"])}


def test_histories_update_outside_the_optimizer_by_max_over_microbatches_and_survive_a_skipped_step():
    recipe = fp8.Fp8Recipe(scaling="delayed", amax_history=4)
    cfg = config_lib.build(config_lib.ExperimentConfig, {
        "train": {"grad_accum_steps": 2}, "data": {"global_batch_size": 4},
        "optimizer": {"muon_clip_tau": 0.0},
        "precision": {"matmul": "fp8", "fp8_scaling": "delayed", "fp8_amax_history": 4}})
    model = _Projection(recipe)
    stage = types.SimpleNamespace(loss_fn=_loss_fn, eval_fn=_eval_fn, policy_path=(), policy_of=lambda cfg: ())
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((4, 16)) * np.asarray([4.0, 1.0, 0.5, 2.0])[:, None], jnp.float32)
    g = jnp.asarray(rng.standard_normal((4, 8)) * np.asarray([0.1, 3.0, 1.0, 0.2])[:, None], jnp.float32)
    batch = {"x": x, "g": g}
    params = model.init(jax.random.PRNGKey(2), x)["params"]
    old = {fp8.COLLECTION: {"w": jnp.asarray([[50.0, 1, 2, 3], [0.5, 1, 1, 1], [40.0, 4, 5, 6]], jnp.float32)}}
    optimizer = optax.sgd(0.1)
    state = step_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                                model_state=old)
    train_step = jax.jit(lambda s, b: step_lib.train_step(s, b, model=model, optimizer=optimizer, stage=stage,
                                                          cfg=cfg))
    new_state, metrics = train_step(state, batch)
    hist = np.asarray(new_state.model_state[fp8.COLLECTION]["w"])
    # microbatch i holds rows i and i + 2 (step.microbatches): its amaxes, combined by max = the whole batch's
    amax = lambda a: float(fp8_lib.amax(a))
    want = [amax(x), amax(params["w"]), amax(g)]
    assert want[0] == max(amax(x[0::2]), amax(x[1::2])) and want[2] == max(amax(g[0::2]), amax(g[1::2]))
    np.testing.assert_array_equal(hist[:, 0], np.asarray(want, np.float32))
    np.testing.assert_array_equal(hist[:, 1:], np.asarray(old[fp8.COLLECTION]["w"])[:, :3])
    # one microbatch's update alone records only its own amaxes (so the max above is not a weighted sum)
    grad_fn = jax.jit(step_lib.loss_and_grad_fn(stage, model, {}, cfg, old))
    (_, aux0), grads0 = grad_fn(params, jax.tree.map(lambda a: a[0::2], batch), jax.random.PRNGKey(0))
    assert float(aux0["model_state"][fp8.COLLECTION]["w"][2, 0]) == amax(g[0::2]) < want[2]
    assert set(grads0) == {"w"}  # the histories are not a gradient: the optimizer never sees them
    assert metrics["fp8/w/g_amax"] == want[2] and int(metrics["skipped_update"]) == 0
    assert int(metrics["fp8/saturated"]) == 0  # the old windows (max 50, 1, 40) cover this step's amaxes
    # a non-finite step keeps the old histories (and params)
    skipped, metrics = train_step(new_state, {"x": x, "g": g.at[1, 1].set(jnp.nan)})
    assert int(metrics["skipped_update"]) == 1 and int(skipped.step) == 2
    np.testing.assert_array_equal(np.asarray(skipped.model_state[fp8.COLLECTION]["w"]), hist)
    # evaluation runs the model with empty histories: current scaling
    y, y_current = jax.jit(lambda p, b: (step_lib.eval_step(p, {}, b, model=model, stage=stage, cfg=cfg)["y"],
                                         _Projection(fp8.Fp8Recipe()).apply({"params": p}, b["x"])))(params, batch)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y_current))


# ---- through the loop: trains, checkpoints and resumes bit-exact with its scaling state -----------------------

def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _state(workdir, step):
    return ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "state"))


def test_fp8_delayed_run_trains_checkpoints_and_resumes_bit_exact_with_its_histories(tmp_path, compile_cache):
    extra = [*FP8_DELAYED, *NARROW, "train.checkpoint_every=3",
             "optimizer.learning_rate=1e-2", "optimizer.warmup_steps=0"]
    whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
    loop.run(_cfg(6, extra), whole)
    loop.run(_cfg(6, extra), parts, stop_after=3)      # checkpoint at 3 (the stop)
    loop.run(_cfg(6, extra), parts)                    # resumes at 3
    a, b = _rows(whole), _rows(parts)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 7))
    losses = np.array([r["loss"] for r in a])
    assert losses[-2:].mean() < losses[:2].mean() - 0.5, losses  # it trains (from ~5.8)
    for key in [k for k in a[-1] if k.startswith(("loss", "grad_norm", "fp8/"))]:
        assert [r.get(key) for r in a] == [r.get(key) for r in b], key
    assert a[-1]["fp8/moe_layers_0/attn/wq/g_amax"] > 0 and "fp8/saturated" in a[-1]
    # the histories [3, 4] of every projection are in the checkpoint (the routed experts scale from the current
    # amax); after 3 steps the window's last column is still empty
    mid = _state(whole, 3)["model_state"][fp8.COLLECTION]
    sites = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(mid)[0]}
    assert {"['moe_layers_0']['attn']['wkv_a']", "['moe_layers_0']['moe']['shared']['w_down']"} <= sites, sites
    for h in jax.tree.leaves(mid):
        assert h.shape == (3, 4) and np.all(h[..., :3] > 0) and np.all(h[..., 3] == 0)
    end_a, end_b = _state(whole, 6), _state(parts, 6)
    flat_a, flat_b = jax.tree_util.tree_flatten_with_path(end_a)[0], jax.tree.leaves(end_b)
    assert len(flat_a) == len(flat_b)
    for (path, x), y in zip(flat_a, flat_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))
    assert all(np.all(np.asarray(h) > 0) for h in jax.tree.leaves(end_a["model_state"]))  # full windows


def test_summary_metrics_and_per_layer_histograms(tmp_path):
    """Scanned stacks' histories [layers, 3, L]: per-site scalars (max over layers), per-layer arrays that the
    metrics writer logs as TensorBoard histograms (not in metrics.jsonl), and the count of clipped tensors."""
    from tensorboardX.proto.event_pb2 import Event
    from kanana_jax.train.metrics import MetricsWriter, _read_records
    old = {"stack": {"attn": {"wq": jnp.asarray([[[1.0, 0], [1.0, 0], [0.0, 0]],        # layer 0: g empty
                                                 [[1.0, 0], [1.0, 0], [1.0, 0]]])}}}    # layer 1
    new = {"stack": {"attn": {"wq": jnp.asarray([[[3.0, 1], [0.5, 1], [9.0, 0]],
                                                 [[1.5, 1], [0.5, 1], [1.0, 1]]])}}}
    m = fp8.summarize(new, old, fp8.Fp8Recipe(scaling="delayed", amax_history=2))
    assert float(m["fp8/stack/attn/wq/x_amax"]) == 3.0 and float(m["fp8/stack/attn/wq/g_amax"]) == 9.0
    np.testing.assert_array_equal(np.asarray(m["fp8/stack/attn/wq/x_amax_by_layer"]), [3.0, 1.5])
    # x of layer 0: 3 > 448 * scale_for(1) = 1.75 (clipped); 1.5 fits; g of layer 0 had no history (current scale)
    assert int(m["fp8/saturated"]) == 1
    writer = MetricsWriter(str(tmp_path), resume_step=0, tensorboard=True, progress_bar=False, total_steps=1)
    writer.write(1, {"loss": 2.0, **jax.device_get(m)})
    writer.close()
    row = json.loads(open(tmp_path / "metrics.jsonl").read())
    assert row["fp8/stack/attn/wq/x_amax"] == 3.0 and "fp8/stack/attn/wq/x_amax_by_layer" not in row
    tb = os.path.join(tmp_path, "tensorboard")
    tags = {v.tag for name in os.listdir(tb) for rec in _read_records(os.path.join(tb, name))
            for v in Event.FromString(rec).summary.value if v.HasField("histo")}
    assert "fp8/stack/attn/wq/x_amax_by_layer" in tags
