"""FP8 matmuls for the model's projections: e4m3 operands forward, e4m3 or e5m2 gradients, fp32 accumulation.

`matmul(x, w, ...)` contracts x's last dims with w's first dims (the einsums of the attention projections and
MLPs) through one 2-D custom_vjp op:
    forward  y  = (q(x)[M,K] . q(w)^T[N,K]) * s_x s_w           e4m3 x e4m3
    backward dx = (q(g)[M,N] . q(w)[K,N])   * s_g s_w           grad dtype x e4m3
             dw = (q(x)^T[K,M] . q(g)^T[N,M]) * s_x s_g         e4m3 x grad dtype
Every GEMM gets both operands contraction-minor ("NT"), the layout cuBLASLt's fp8 kernels take, so XLA's fp8
dot_general lowering (`__cublas$lt$matmul$f8` on Hopper) needs no transpose of its own; the transposes above are
fused into the quantizing passes. Master weights, their gradients (in w's dtype) and the optimizer are
untouched: only the three GEMMs see fp8. The weight's quantization (q(w) in both layouts, s_w, its amax) happens
outside the custom_vjp (`quantize_weight`): in the call, or once per optimizer step by the train step
(model/fp8_weights.py, precision.fp8_prequantize), whose copies the sites read from the 'fp8_weights' collection
(`prequantized`); w stays the op's differentiable input and gets dw either way.

Scaling (pallas_kernels/fp8.py: power-of-two per-tensor scales, saturating casts):
- 'current': s = scale_for(amax of the tensor now) (one reduction pass before each quantization).
- 'delayed': s = scale_for(max of an amax history [3, L] = rows x, w, g over the last L steps), the current
  amaxes recorded without waiting for them; a history with no entry yet (all zeros) falls back to the current
  amax. The op returns the updated history (rolled by one, newest in column 0) as the cotangent of its
  `history` argument, so a train step that differentiates the 'fp8_meta' collection gets the new state as its
  "gradient" (the flax fp8_ops convention) and stores it in the train state.

Delayed scaling in training (kanana_jax/train/step.py): the histories live in TrainState.model_state
({'fp8_meta': ...}; {} for every other run), are checkpointed with it and resume bit-exact. The step hands the
stage a model whose `.apply` adds them to the variables, differentiates the loss w.r.t. (params, model_state),
and stores the cotangent as the new histories: outside the optimizer and the gradient norm, combined over
microbatches by elementwise max (every microbatch scales from the same old history; the newest column becomes the
amax over the whole batch), kept unchanged on a skipped non-finite step. Constraint: a stage differentiates at
most one fp8 forward of the model per microbatch (two would add two rolled histories); a forward whose output is
stop-gradient'ed (DPO's reference log-probs) runs no backward and contributes nothing. A site whose forward is
not differentiated at all in a step gets an all-zero history (it falls back to current scaling next step).
Evaluation (forward only) scales from the current amaxes (empty histories): the histories are the training
step's way to skip an amax pass, not part of what the model computes.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import fp8 as fp8_lib

COLLECTION = "fp8_meta"  # flax collection holding the delayed-scaling amax histories [3, L] per matmul site
WEIGHTS = "fp8_weights"  # flax collection of weights' fp8 copies made once per step (model/fp8_weights.py)
ROWS = ("x", "w", "g")
_NT = (((1,), (1,)), ((), ()))  # contract dim 1 of both operands


@dataclasses.dataclass(frozen=True)
class Fp8Recipe:
    """The model's view of the `precision` config section when precision.matmul == 'fp8'."""
    grad_dtype: str = "e5m2"        # format of the quantized output gradient: 'e4m3' | 'e5m2'
    scaling: str = "current"        # 'current' | 'delayed'
    amax_history: int = 16          # delayed scaling: steps of amax history per tensor
    lm_head: bool = False           # also run the LM head in fp8
    dot_form: str = "direct"        # 'direct': fp8 dot, f32 out, then scaled; 'dequant': f32 dequantize-then-dot
    expert_wgrad: bool = False      # routed experts' dW as an fp8 tgmm (pallas_kernels/moe/fp8.py wgrad='fp8')

    def __post_init__(self):
        fp8_lib.format_dtype(self.grad_dtype)
        if self.scaling not in ("current", "delayed"):
            raise ValueError(f"fp8 scaling {self.scaling!r}; allowed: 'current', 'delayed'")
        if self.amax_history < 1:
            raise ValueError(f"fp8 amax_history must be >= 1, got {self.amax_history}")
        if self.dot_form not in ("direct", "dequant"):
            raise ValueError(f"fp8 dot_form {self.dot_form!r}; allowed: 'direct', 'dequant'")

    @property
    def delayed(self) -> bool:
        return self.scaling == "delayed"


def recipe_from(precision) -> Fp8Recipe | None:
    """Fp8Recipe of a validated `precision` section (config.PrecisionConfig), None for bf16 matmuls."""
    if precision is None or precision.matmul != "fp8":
        return None
    return Fp8Recipe(grad_dtype=precision.fp8_grad_dtype, scaling=precision.fp8_scaling,
                     amax_history=precision.fp8_amax_history, lm_head=precision.fp8_lm_head,
                     expert_wgrad=precision.fp8_expert_wgrad)


def _scale(amax_now, history_row, delayed: bool, dtype):
    """Scale for one tensor: from the current amax, or from its history (current amax while it is empty)."""
    if not delayed:
        return fp8_lib.scale_for(amax_now, dtype)
    past = jnp.max(history_row)  # a select, not a lax.cond: amax_now is computed anyway (it enters the history)
    return fp8_lib.scale_for(jnp.where(past > 0, past, amax_now), dtype)


def _dot(a, sa, b, sb, form):
    """(a . b^T) * sa sb in float32 for fp8 a[M,K], b[N,K]."""
    if form == "dequant":  # the pattern XLA's GEMM rewriter folds into the fp8 GEMM's scale operands
        return lax.dot_general(fp8_lib.dequantize(a, sa), fp8_lib.dequantize(b, sb), _NT,
                               preferred_element_type=jnp.float32)
    return lax.dot_general(a, b, _NT, preferred_element_type=jnp.float32) * (sa * sb)


def quantize_weight(w_xKxN, history_xL=None, delayed: bool = False):
    """The e4m3 copies of a weight as the dense op reads them, per matrix of the leading dims (a scanned stack):
    {'q': [...,K,N], 'q_t': [...,N,K] (the forward's contraction-minor layout), 's': [...] power-of-two scale,
    'amax': [...] float32} from the current amax, or (delayed) from the w row of `history_xL` [..., L] (the
    current amax while it is empty)."""
    amax_x = fp8_lib.amax(w_xKxN, axis=(-2, -1))
    if delayed and history_xL is not None:
        past_x = jnp.max(history_xL, axis=-1)  # a select, not a lax.cond: the current amax enters the history
        s_x = fp8_lib.scale_for(jnp.where(past_x > 0, past_x, amax_x), fp8_lib.E4M3)
    else:
        s_x = fp8_lib.scale_for(amax_x, fp8_lib.E4M3)
    q = fp8_lib.quantize(w_xKxN, fp8_lib.E4M3, s_x[..., None, None])
    return {"q": q, "q_t": jnp.swapaxes(q, -1, -2), "s": s_x, "amax": amax_x}


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _matmul_2d(x_MxK, w_KxN, qw_KxN, qw_NxK, sw, aw, history_3xL, grad_dtype, delayed, out_dtype, form):
    return _matmul_2d_fwd(x_MxK, w_KxN, qw_KxN, qw_NxK, sw, aw, history_3xL, grad_dtype, delayed, out_dtype,
                          form)[0]


def _matmul_2d_fwd(x_MxK, w_KxN, qw_KxN, qw_NxK, sw, aw, history_3xL, grad_dtype, delayed, out_dtype, form):
    """w only stands for the differentiable weight (dW's dtype); the GEMMs read its fp8 copies qw, qw^T."""
    ax = fp8_lib.amax(x_MxK)
    sx = _scale(ax, history_3xL[0], delayed, fp8_lib.E4M3)
    qx = fp8_lib.quantize(x_MxK, fp8_lib.E4M3, sx)
    y = _dot(qx, sx, qw_NxK, sw, form).astype(out_dtype)
    return y, (qx, sx, qw_KxN, sw, history_3xL, ax, aw, jnp.zeros((0,), x_MxK.dtype),
               jnp.zeros((0,), w_KxN.dtype))


def _matmul_2d_bwd(grad_dtype, delayed, out_dtype, form, res, g_MxN):
    qx, sx, qw, sw, history_3xL, ax, aw, x_proto, w_proto = res
    gdt = fp8_lib.format_dtype(grad_dtype)
    ag = fp8_lib.amax(g_MxN)
    sg = _scale(ag, history_3xL[2], delayed, gdt)
    qg = fp8_lib.quantize(g_MxN, gdt, sg)
    dx = _dot(qg, sg, qw, sw, form).astype(x_proto.dtype)
    dw = _dot(qx.T, sx, qg.T, sg, form).astype(w_proto.dtype)
    new_history = jnp.roll(history_3xL, 1, axis=1).at[:, 0].set(jnp.stack([ax, aw, ag]))
    return dx, dw, None, None, None, None, new_history  # no cotangent for the weight's fp8 copies and scale


_matmul_2d.defvjp(_matmul_2d_fwd, _matmul_2d_bwd)


def matmul(x, w, recipe: Fp8Recipe, *, n_contract: int = 1, history=None, out_dtype=None, pre=None):
    """x[..., K1..Kn] @ w[K1..Kn, N...] -> [..., N...] through fp8 GEMMs (see the module docstring).

    Equals jnp.einsum over the shared K dims up to fp8 rounding. `history` [3, L] float32 holds the amaxes of
    (x, w, g) for delayed scaling (ignored under current scaling). Output in `out_dtype` (default x.dtype).
    `pre`: w's fp8 copies made ahead (`quantize_weight` of w as [K, N], from the same history: the step makes
    them once per optimizer step, model/fp8_weights.py); read as given, w still receives dW. Without it they
    are made here."""
    k_dims = x.shape[x.ndim - n_contract:]
    if tuple(w.shape[:n_contract]) != tuple(k_dims):
        raise ValueError(f"fp8 matmul: x {x.shape} and w {w.shape} disagree on the {n_contract} contracted dims")
    lead, n_dims = x.shape[:x.ndim - n_contract], w.shape[n_contract:]
    k, n = math.prod(k_dims), math.prod(n_dims)
    if history is None:
        history = jnp.zeros((3, 1), jnp.float32)
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    w_KxN = w.reshape(k, n)
    if pre is None:
        pre = quantize_weight(lax.stop_gradient(w_KxN), history[1], recipe.delayed)
    elif pre["q_t"].shape != (n, k):
        raise ValueError(f"fp8 matmul: pre-quantized q_t {pre['q_t'].shape} does not fit w {w.shape} with "
                         f"{n_contract} contracted dims (want {(n, k)}); see model/fp8_weights.py")
    y = _matmul_2d(x.reshape(-1, k), w_KxN, pre["q"], pre["q_t"], pre["s"], pre["amax"], history,
                   recipe.grad_dtype, recipe.delayed, out_dtype, recipe.dot_form)
    return y.reshape(lead + n_dims)


def reference_matmul(x, w, recipe: Fp8Recipe, *, n_contract: int = 1, history=None):
    """float32 oracle of `matmul`'s forward: the same quantization, dequantized, then an f32 einsum."""
    k = math.prod(x.shape[x.ndim - n_contract:])
    x2, w2 = x.reshape(-1, k), w.reshape(k, -1)
    history = jnp.zeros((3, 1), jnp.float32) if history is None else history
    sx = _scale(fp8_lib.amax(x2), history[0], recipe.delayed, fp8_lib.E4M3)
    sw = _scale(fp8_lib.amax(w2), history[1], recipe.delayed, fp8_lib.E4M3)
    xd = fp8_lib.dequantize(fp8_lib.quantize(x2, fp8_lib.E4M3, sx), sx)
    wd = fp8_lib.dequantize(fp8_lib.quantize(w2, fp8_lib.E4M3, sw), sw)
    y = jnp.dot(xd, wd, precision=lax.Precision.HIGHEST)
    return y.reshape(x.shape[:x.ndim - n_contract] + w.shape[n_contract:])


# ---- model-side helpers ---------------------------------------------------------------------------------------

def history_variable(module, name: str, recipe: Fp8Recipe | None):
    """The amax-history variable [3, L] of one matmul site under delayed scaling (else None). Call from a
    module's setup or compact __call__."""
    if recipe is None or not recipe.delayed:
        return None
    return module.variable(COLLECTION, name, jnp.zeros, (3, recipe.amax_history), jnp.float32)


def prequantized(module, name: str):
    """The fp8 copies of `module`'s weight `name` that the step made ahead (the 'fp8_weights' collection), or None
    (then the matmul quantizes the weight itself)."""
    return module.get_variable(WEIGHTS, name) if module.has_variable(WEIGHTS, name) else None


def project(x, w, dtype, recipe: Fp8Recipe | None, spec: str, *, n_contract: int = 1, history_var=None,
            pre=None):
    """One projection site: the model's bf16 einsum `spec` when recipe is None, else the fp8 matmul (`pre`: the
    weight's fp8 copies made ahead, see `matmul`)."""
    if recipe is None:
        return jnp.einsum(spec, x, w.astype(dtype))
    return matmul(x.astype(dtype), w.astype(dtype), recipe, n_contract=n_contract,
                  history=None if history_var is None else history_var.value, pre=pre)


def summarize(fp8_meta, old_meta=None, recipe: Fp8Recipe | None = None) -> dict:
    """Summary metrics of an updated 'fp8_meta' tree (column 0 = this step's amaxes):
      'fp8/<site path>/<x|w|g>_amax'           newest amax of the site (scanned stacks: max over their layers)
      'fp8/<site path>/<x|w|g>_amax_by_layer'  [layers] the same per layer of a scanned stack (an array: the
                                               metrics writer logs it as a TensorBoard histogram)
      'fp8/saturated'                          (with `old_meta`, the histories the step scaled from, and `recipe`)
                                               tensors (site x layer x row) whose amax this step exceeded the
                                               range of the scale they were quantized with: clipped to fp8_max
    """
    out = {}
    flat = jax.tree_util.tree_flatten_with_path(fp8_meta)[0]
    for path, hist in flat:
        name = "/".join(str(getattr(p, "key", p)) for p in path)
        newest_Nx3 = hist[..., 0].reshape(-1, 3)
        for i, row in enumerate(ROWS):
            out[f"fp8/{name}/{row}_amax"] = jnp.max(newest_Nx3[:, i])
            if hist.ndim > 2:
                out[f"fp8/{name}/{row}_amax_by_layer"] = newest_Nx3[:, i]
    if old_meta is not None and recipe is not None:
        out["fp8/saturated"] = sum((saturated(new, old, recipe) for new, old in
                                    zip(jax.tree.leaves(fp8_meta), jax.tree.leaves(old_meta))),
                                   jnp.zeros((), jnp.int32))
    return out


def saturated(new_history, old_history, recipe: Fp8Recipe):
    """How many of the tensors of one site (x, w, g of each stacked layer) had an amax this step (new_history's
    column 0) above fp8_max * the scale their old history gave: values clipped by delayed scaling."""
    fmts = (fp8_lib.E4M3, fp8_lib.E4M3, fp8_lib.format_dtype(recipe.grad_dtype))
    past_Nx3 = jnp.max(old_history, axis=-1).reshape(-1, 3)
    now_Nx3 = new_history[..., 0].reshape(-1, 3)
    count = jnp.zeros((), jnp.int32)
    for i, fmt in enumerate(fmts):
        limit = fp8_lib.fp8_max(fmt) * fp8_lib.scale_for(past_Nx3[:, i], fmt)
        count += jnp.sum((past_Nx3[:, i] > 0) & (now_Nx3[:, i] > limit)).astype(jnp.int32)
    return count


def check_supported(recipe: Fp8Recipe | None, *, platform: str | None = None, moe_impl: str | None = None,
                    for_timing: bool = False):
    """Raises a ValueError naming the config key when fp8 cannot run as asked (no silent fallback)."""
    if recipe is None:
        return
    platform = platform or jax.default_backend()
    if moe_impl == "ragged_dot":
        raise ValueError("precision.matmul='fp8' needs model.moe_impl='pallas' (or 'blocked' on CPU): "
                         "jax.lax.ragged_dot takes no fp8 operands with scales")
    if platform in ("gpu", "cuda"):
        dev = jax.devices()[0]
        cc = getattr(dev, "compute_capability", None)
        if cc is not None and float(cc) < 8.9:
            raise ValueError(f"precision.matmul='fp8' needs an fp8 tensor-core GPU (compute capability >= 8.9, "
                             f"Ada/Hopper); {dev.device_kind} has {cc}: use precision.matmul='bf16'")
    elif for_timing:
        raise ValueError(f"precision.matmul='fp8' speed cannot be measured on {platform!r}: only Hopper-class "
                         "GPUs (and TPU v7) run fp8 matmuls natively; there fp8 is emulated (storage format)")
