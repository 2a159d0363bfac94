"""Polar factor of batches of matrices: Polar Express / Newton-Schulz polynomial iterations and exact SVD.

Every matrix is handled on its short side (m = min(rows, cols), n = max): tall matrices are never
transposed in memory, the einsums contract over the long axis instead. Arithmetic is bf16 with fp32
accumulation by default. Two equivalent schedules of the same polynomial iteration:

direct  X <- a X + (b A + c A^2) X with A = X X^T:           K (4 m^2 n + 2 m^3) flops.
gram    keep Q (m x m) with X_k = Q X_0 and iterate on m x m matrices only, A_k = Q A_0 Q;
        restart (X_b <- Q X_b, A_0 <- X_b X_b^T) whenever a segment's gain would exceed
        `max_segment_gain` (see `restart_steps`), because bf16 round-off E in A_0 reaches X X^T as
        Q E Q, i.e. amplified by the segment gain squared. For the 5-step set the restarts fall at
        steps 1 and 3: 22 m^3 + 12 m^2 n flops, 15% fewer than direct at the expert shape 768 x 2048.
`algorithm='auto'` picks the cheaper one from `flops`.

Scalars are folded into compile-time GEMM alphas, which XLA GPU fuses into the cuBLAS call:
P = a P~ with P~ = I + A~ + kappa A~^2, A~ = (b/a) A, kappa = c a / b^2; Q and X are stored
divided by the running product of the a's, and the Frobenius norm (from trace(X X^T)) is folded
into the first Q. On a GPU, X X^T and P~ are each one symmetric Gram-plus-affine kernel (`pallas_kernels.polar`:
upper tiles only, P~ formed in its epilogue); elsewhere a GEMM, and for P~ one elementwise pass over m x m. No step
makes an elementwise pass over the m x n matrices.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from kanana_jax.optim import polar_express
from pallas_kernels.polar import ops as polar_ops

Quintic = polar_express.Quintic
F32 = jnp.float32


def restart_steps(coeffs: Sequence[Quintic], max_segment_gain: float = 16.0,
                  max_segment_steps: int = 2) -> frozenset[int]:
    """Steps at which the gram schedule recomputes X and its Gram matrix.

    Inside a segment Q is a polynomial of the stored bf16 Gram matrix A_b; a direction whose eigenvalue is
    below A_b's round-off (~2^-9 |A_b|) is multiplied by the product of the segment's linear coefficients a
    (its gain) instead of by p(sigma)/sigma: X X^T picks up Q E Q, ~ gain^2 * 2^-9. Errors made late are not
    corrected by later steps, so segments are cut greedily from the last step backwards, each with at most
    max_segment_steps steps and gain <= max_segment_gain (both inf: never restart). On ill-conditioned
    test matrices these limits keep max |sigma - 1| within ~0.1 of the direct schedule's (no blow-up; see
    tests/test_polar_express.py); for the 5-step set the
    restarts fall at steps 1 and 3 (segment gains 8.2, 15.7, 7.7).
    """
    out, gain, length = set(), 1.0, 0
    for k in range(len(coeffs) - 1, 0, -1):
        gain *= abs(coeffs[k][0])
        length += 1
        if gain * abs(coeffs[k - 1][0]) > max_segment_gain or length >= max_segment_steps:
            out.add(k)
            gain, length = 1.0, 0
    return frozenset(out)


def flops(m: int, n: int, steps: int, algorithm: str, restarts: Sequence[int] = (1, 3)) -> int:
    """Matmul flops of one m x n (m <= n) orthogonalization under `algorithm` in {direct, gram}."""
    if algorithm == "direct":
        return steps * (4 * m * m * n + 2 * m**3)
    restarts = set(restarts)
    mm3 = 0
    for k in range(steps):
        first_of_segment = k == 0 or k in restarts
        mm3 += 1 + (0 if first_of_segment else 1)          # A^2, Q update
        if k < steps - 1 and (k + 1) not in restarts:
            mm3 += 2                                       # A_{k+1} = Q A_b Q
    mmn = 2 + 2 * len(restarts)                            # first gram, final apply, 2 per restart
    return 2 * m**3 * mm3 + 2 * m * m * n * mmn


def choose_algorithm(m: int, n: int, steps: int, restarts: Sequence[int] = (1, 3)) -> str:
    return "gram" if flops(m, n, steps, "gram", restarts) < flops(m, n, steps, "direct") else "direct"


def _mm(spec: str, lhs, rhs, ep):
    """einsum with fp32 accumulation, result in the epilogue dtype `ep` (bf16: cuBLAS writes bf16 directly)."""
    return jnp.einsum(spec, lhs, rhs, preferred_element_type=ep)


def _gram(x, tall: bool, dtype, kernel, alpha: float = 1.0):
    """alpha * x x^T on the short side: [B, m, m] (one symmetric kernel on a GPU, `pallas_kernels.polar`)."""
    return polar_ops.gram_affine(x, None, alpha, 0.0, 0.0, transposed=tall, out_dtype=dtype, **kernel)


def _apply_left(q_BxMxM, x, tall: bool, ep, alpha: float = 1.0):
    """alpha * Q X on the short side, returned in x's layout."""
    out = _mm("brj,bij->bri", x, q_BxMxM, ep) if tall else _mm("bij,bjc->bic", q_BxMxM, x, ep)
    return out if alpha == 1.0 else alpha * out


def _check_coeffs(coeffs: Sequence[Quintic]):
    for a, b, _ in coeffs:
        if a == 0 or b == 0:
            raise ValueError(f"polynomial (a={a}, b={b}) has a zero linear or cubic term; the folded "
                             "iteration divides by both (use method='svd' for exact polar factors)")


def _poly(at, kappa: float, dtype, kernel, scale=None):
    """P~ = (I + A~ + kappa A~ A~^T) * scale for symmetric A~, with A~ = (b/a) A: the step polynomial is P = a P~.

    One pass (`pallas_kernels.polar`): on a GPU one fused kernel; elsewhere one GEMM and one elementwise pass
    (XLA does not fuse matrix-bias adds into batched cuBLAS GEMMs). scale: None or [B, 1, 1].
    """
    s = 1.0 if scale is None else scale.reshape(-1)
    return polar_ops.gram_affine(at, at, kappa * s, s, s, out_dtype=dtype, **kernel)


def _gram_iteration(xs, talls, coeffs, safety, dtype, ep, restarts, out_scales, out_dtypes, eps, kernel):
    """Gram-space schedule for members xs[i] [B_i, r, c] sharing (m, n); returns their polar factors."""
    steps = len(coeffs)
    sizes = [x.shape[0] for x in xs]
    splits = [sum(sizes[:i + 1]) for i in range(len(sizes) - 1)]
    cat = (lambda arrs: arrs[0]) if len(xs) == 1 else (lambda arrs: jnp.concatenate(arrs, axis=0))
    split = (lambda a: [a]) if len(xs) == 1 else (lambda a: jnp.split(a, splits, axis=0))
    base = list(xs)                                   # X_b per member; true X_T = rho * X_b
    a_base = cat([_gram(x, t, dtype, kernel) for x, t in zip(base, talls)])   # A_b_true = f_base * a_base
    nu2 = jnp.trace(a_base.astype(F32), axis1=1, axis2=2) * safety**2 + eps
    rho = jax.lax.rsqrt(nu2)[:, None, None]           # runtime 1/||X||_F, folded into the first segment's Q
    f_base = 1.0
    q, sigma, at = None, 1.0, None                    # rho Q_T = sigma Q~ (sigma: product of the a's)
    for k, (a, b, c) in enumerate(coeffs):
        if k in restarts:
            base = [_apply_left(qi, x, t, ep, sigma).astype(dtype) for qi, x, t in zip(split(q), base, talls)]
            # Store (b/a) X X^T directly so the segment needs no elementwise pass on A.
            a_base = cat([_gram(x, t, dtype, kernel, b / a) for x, t in zip(base, talls)])
            f_base, q, sigma, rho = a / b, None, 1.0, None
            at = a_base
        elif q is None:
            at = ((b / a) * a_base.astype(F32) * (rho * rho)).astype(dtype)
        kappa = c * a / (b * b)
        if q is None:
            q = _poly(at, kappa, dtype, kernel, rho)
        else:
            q = _mm("bij,bjk->bik", _poly(at, kappa, dtype, kernel), q, ep).astype(dtype)
        sigma *= a
        if k < steps - 1 and (k + 1) not in restarts:
            a1, b1, _ = coeffs[k + 1]
            w = _mm("bij,bjk->bik", a_base, q, ep).astype(dtype)
            at = ((b1 / a1) * sigma * sigma * f_base * _mm("bij,bjk->bik", q, w, ep)).astype(dtype)
    return [_apply_left(qi, x, t, F32, sigma * s).astype(od)
            for qi, x, t, od, s in zip(split(q), base, talls, out_dtypes, out_scales)]


def _direct_iteration(x, tall, coeffs, safety, dtype, ep, out_scale, out_dtype, eps, kernel):
    """X-space schedule for one member [B, r, c]."""
    x32 = x.astype(F32)
    nu = jnp.sqrt(jnp.sum(x32 * x32, axis=(1, 2), keepdims=True)) * safety + eps
    xt, sigma = (x32 / nu).astype(dtype), 1.0          # X_true = sigma * xt
    for k, (a, b, c) in enumerate(coeffs):
        at = _gram(xt, tall, dtype, kernel, (b / a) * sigma * sigma)
        sigma *= a
        alpha = sigma * out_scale if k == len(coeffs) - 1 else 1.0
        xt = _apply_left(_poly(at, c * a / (b * b), dtype, kernel), xt, tall,
                         F32 if k == len(coeffs) - 1 else ep, alpha)
    return xt.astype(out_dtype)


def svd_polar(x, out_dtype=None):
    """Exact polar factor U V^T of [..., r, c] via fp32 SVD (rank-deficient directions map to 0)."""
    u, _, vh = jnp.linalg.svd(x.astype(F32), full_matrices=False)
    return (u @ vh).astype(out_dtype or x.dtype)


def orthogonalize_group(xs: Sequence[jax.Array], *, method: str = "polar_express",
                        coeffs: str | Sequence[Quintic] | None = None, steps: int | None = None,
                        safety: float | None = None, dtype=jnp.bfloat16, algorithm: str = "auto",
                        max_segment_gain: float = 16.0, max_segment_steps: int = 2,
                        out_scales: Sequence[float] | None = None, out_dtypes: Sequence | None = None, epilogue_dtype=None,
                        eps: float = 1e-30, kernel_backend: str | None = None,
                        interpret: bool = False) -> list[jax.Array]:
    """Polar factors of xs[i] [B_i, r_i, c_i] sharing (min, max) of (r, c), as one batched einsum chain.

    out_scales[i] (python floats) multiply member i's result inside the last GEMM. epilogue_dtype (default:
    dtype) is the GEMM output type in which `alpha * L @ R + C` is formed. kernel_backend / interpret pick the
    kernel of the Gram matrices and step polynomials (`pallas_kernels.polar.ops.gram_affine`; None: the symmetric
    GPU kernel on a GPU).
    """
    if not xs:
        return []
    shapes = {(min(x.shape[1:]), max(x.shape[1:])) for x in xs}
    if len(shapes) != 1 or any(x.ndim != 3 for x in xs):
        raise ValueError(f"orthogonalize_group needs [B, r, c] members with one (min, max) side pair, got "
                         f"{[x.shape for x in xs]}")
    (m, n), = shapes
    out_scales = list(out_scales) if out_scales is not None else [1.0] * len(xs)
    out_dtypes = list(out_dtypes) if out_dtypes is not None else [x.dtype for x in xs]
    if method == "svd":
        return [(s * svd_polar(x, F32)).astype(od) for x, s, od in zip(xs, out_scales, out_dtypes)]
    if method not in ("polar_express", "newton_schulz"):
        raise ValueError(f"method={method!r}; allowed: 'polar_express', 'newton_schulz', 'svd'")
    if method == "newton_schulz":
        if coeffs not in (None, "newton_schulz_5"):
            raise ValueError(f"method='newton_schulz' uses Jordan's quintic; got coeffs={coeffs!r} "
                             "(use method='polar_express' for other schedules)")
        coeffs = "newton_schulz_5"
    elif coeffs is None:
        coeffs = "polar_express_5"
    sched, preset_safety = polar_express.resolve(coeffs, steps)
    safety = preset_safety if safety is None else safety
    _check_coeffs(sched)
    restarts = restart_steps(sched, max_segment_gain, max_segment_steps)
    if algorithm == "auto":
        algorithm = choose_algorithm(m, n, len(sched), restarts)
    talls = [x.shape[1] > x.shape[2] for x in xs]
    xs = [x.astype(dtype) for x in xs]
    ep = dtype if epilogue_dtype is None else epilogue_dtype
    kernel = dict(backend=kernel_backend, interpret=interpret)
    if algorithm == "gram":
        return _gram_iteration(xs, talls, sched, safety, dtype, ep, restarts, out_scales, out_dtypes, eps, kernel)
    if algorithm == "direct":
        return [_direct_iteration(x, t, sched, safety, dtype, ep, s, od, eps, kernel)
                for x, t, s, od in zip(xs, talls, out_scales, out_dtypes)]
    raise ValueError(f"algorithm={algorithm!r}; allowed: 'auto', 'gram', 'direct'")


def _batched(fn, x, **kw):
    if x.ndim < 2:
        raise ValueError(f"orthogonalization needs a matrix or a batch of matrices, got shape {x.shape}")
    lead = x.shape[:-2]
    out, = fn([x.reshape((-1,) + x.shape[-2:])], **kw)
    return out.reshape(lead + x.shape[-2:])


def polar(x, coeffs: str | Sequence[Quintic] = "polar_express_5", *, steps: int | None = None,
          safety: float | None = None, dtype=jnp.bfloat16, algorithm: str = "auto",
          max_segment_gain: float = 16.0, max_segment_steps: int = 2, out_dtype=None):
    """Approximate polar factor of x [..., r, c] by the Polar Express iteration (batched over leading axes)."""
    return _batched(orthogonalize_group, x, method="polar_express", coeffs=coeffs, steps=steps, safety=safety,
                    dtype=dtype, algorithm=algorithm, max_segment_gain=max_segment_gain,
                    max_segment_steps=max_segment_steps,
                    out_dtypes=[out_dtype or x.dtype])


def newton_schulz(x, steps: int = 5, *, dtype=jnp.bfloat16, algorithm: str = "direct", out_dtype=None):
    """Keller Jordan's quintic Newton-Schulz (3.4445, -4.7750, 2.0315) on x [..., r, c]."""
    return _batched(orthogonalize_group, x, method="newton_schulz", steps=steps, dtype=dtype,
                    algorithm=algorithm, out_dtypes=[out_dtype or x.dtype])
