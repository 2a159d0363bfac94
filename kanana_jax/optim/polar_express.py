"""Polar Express coefficients (Amsel, Persson, Musco, Gower 2025), derived in float64 numpy.

Each step of the iteration applies an odd quintic p(x) = a x + b x^3 + c x^5 to the singular
values. Step t uses the minimax-optimal quintic for the interval [l_t, u_t] that the previous
steps guarantee; the optimum equioscillates at l, q, r, u (Chebyshev alternation), which a
Remez exchange finds in a few iterations. The composition of these greedy optima is the optimal
degree-5^T polynomial for the sign function on [l, 1] (Theorem 4.1 of the paper).

Two practical tweaks, both from the paper:
- cushion: the quintic is fitted on [max(l, cushion*u), u] and then rescaled so that it is centred
  on 1 over the true [l, u]; this keeps the slope at tiny singular values bounded in bf16.
- safety: each polynomial but the last is evaluated at x/safety (a -> a/s, b -> b/s^3,
  c -> c/s^5) so that round-off that pushes a singular value slightly above u cannot blow up.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

Quintic = tuple[float, float, float]

# Keller Jordan's quintic for Newton-Schulz (maximal slope at 0, converges only to ~[0.7, 1.2]).
NEWTON_SCHULZ_QUINTIC: Quintic = (3.4445, -4.7750, 2.0315)

# The optimal quintic once [l, u] has collapsed onto 1 (limit of `optimal_quintic(u, u)`).
FIXED_POINT_QUINTIC: Quintic = (15 / 8, -10 / 8, 3 / 8)

# Published 5-step set (modded-nanogpt, Polar Express): l=1e-3, cushion 0.02, safety 1.02 applied
# inside the recurrence, last step unscaled. `optimal_composition(1e-3, 5)` reproduces it.
MODDED_NANOGPT_5: tuple[Quintic, ...] = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)

# The paper's 8-step set before its safety factor: l=1e-3, cushion 0.02407327424182761.
PAPER_8_RAW: tuple[Quintic, ...] = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
)
PAPER_CUSHION = 0.02407327424182761


def apply_safety(coeffs: Sequence[Quintic], safety: float) -> tuple[Quintic, ...]:
    """Evaluate every polynomial but the last at x/safety (the paper's post-hoc safety factor)."""
    out = [(a / safety, b / safety**3, c / safety**5) for a, b, c in coeffs[:-1]]
    return tuple(out) + (tuple(coeffs[-1]),)


# Named presets: coefficient schedule and the Frobenius-norm safety margin to normalise with.
PRESETS: dict[str, tuple[tuple[Quintic, ...], float]] = {
    "polar_express_5": (MODDED_NANOGPT_5, 1.02),
    "polar_express_8": (apply_safety(PAPER_8_RAW, 1.01), 1.01),
    "newton_schulz_5": ((NEWTON_SCHULZ_QUINTIC,) * 5, 1.0),
}


def quintic(coeffs: Quintic, x):
    """p(x) = a x + b x^3 + c x^5 for scalars or numpy arrays."""
    a, b, c = coeffs
    x2 = x * x
    return x * (a + x2 * (b + c * x2))


def optimal_quintic(lower: float, upper: float, tol: float = 1e-15, max_iter: int = 100) -> Quintic:
    """Odd quintic minimising max |1 - p(x)| over [lower, upper] (Remez exchange, float64)."""
    if not 0 < lower <= upper:
        raise ValueError(f"optimal_quintic needs 0 < lower <= upper, got lower={lower}, upper={upper}")
    if lower / upper >= 1 - 5e-6:
        # The interval has collapsed: the limit is the degree-5 Taylor fit of 1/sqrt at u^2.
        a, b, c = FIXED_POINT_QUINTIC
        return a / upper, b / upper**3, c / upper**5
    # Alternation points l < q < r < u with errors +E, -E, +E, -E; q, r start evenly spaced.
    q, r = (3 * lower + upper) / 4, (lower + 3 * upper) / 4
    err_prev = math.inf
    for _ in range(max_iter):
        pts = np.array([lower, q, r, upper])
        lhs = np.stack([pts, pts**3, pts**5, np.array([1.0, -1.0, 1.0, -1.0])], axis=1)
        a, b, c, err = np.linalg.solve(lhs, np.ones(4))
        # New interior points: the critical points of p, roots of 5c y^2 + 3b y + a (y = x^2).
        disc = math.sqrt(9 * b * b - 20 * a * c)
        q, r = math.sqrt((-3 * b - disc) / (10 * c)), math.sqrt((-3 * b + disc) / (10 * c))
        if abs(err - err_prev) <= tol:
            break
        err_prev = err
    else:
        raise RuntimeError(f"Remez exchange on [{lower}, {upper}] did not converge in {max_iter} iterations")
    return float(a), float(b), float(c)


def optimal_composition(lower: float = 1e-3, num_iters: int = 5, safety: float = 1.02,
                        cushion: float = 0.02, safety_in_recurrence: bool = True) -> tuple[Quintic, ...]:
    """Greedy-optimal quintic schedule mapping singular values in [lower, 1] towards 1.

    safety_in_recurrence=True propagates the bound through the safety-scaled polynomial (how the
    modded-nanogpt 5-step set was made); False applies the safety after the derivation (the paper).
    The last polynomial is never safety-scaled.
    """
    if not 0 < lower < 1:
        raise ValueError(f"lower must lie in (0, 1), got {lower}")
    if num_iters < 1:
        raise ValueError(f"num_iters must be >= 1, got {num_iters}")
    lo, hi = lower, 1.0
    coeffs: list[Quintic] = []
    for t in range(num_iters):
        a, b, c = optimal_quintic(max(lo, cushion * hi), hi)
        # Re-centre on 1 over the true [lo, hi]: 1 - p(lo) = p(hi) - 1.
        scale = 2 / (quintic((a, b, c), lo) + quintic((a, b, c), hi))
        poly = (a * scale, b * scale, c * scale)
        if safety_in_recurrence and t < num_iters - 1:
            poly = (poly[0] / safety, poly[1] / safety**3, poly[2] / safety**5)
        coeffs.append(poly)
        lo = quintic(poly, lo)
        hi = 2 - lo
    if not safety_in_recurrence:
        return apply_safety(coeffs, safety)
    return tuple(coeffs)


def composite_range(coeffs: Sequence[Quintic], lower: float, upper: float = 1.0,
                    num_points: int = 20001) -> tuple[float, float]:
    """(min, max) of the composed polynomial over [lower, upper], on a dense log grid (float64)."""
    x = np.geomspace(lower, upper, num_points)
    for poly in coeffs:
        x = quintic(poly, x)
    return float(x.min()), float(x.max())


def resolve(coeffs: str | Sequence[Quintic], steps: int | None = None) -> tuple[tuple[Quintic, ...], float]:
    """(schedule, norm safety) for a preset name or an explicit schedule (safety 1.0), cut/extended to steps."""
    if isinstance(coeffs, str):
        if coeffs not in PRESETS:
            raise ValueError(f"unknown coefficient preset {coeffs!r}; choose one of {sorted(PRESETS)}")
        sched, safety = PRESETS[coeffs]
    else:
        sched, safety = tuple(tuple(float(v) for v in c) for c in coeffs), 1.0
        if any(len(c) != 3 for c in sched) or not sched:
            raise ValueError(f"coefficients must be a non-empty sequence of (a, b, c) triples, got {coeffs!r}")
    if steps is not None:
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        # Past the end: a constant schedule repeats; otherwise the interval has collapsed onto 1 and
        # the optimal quintic is the limit (15/8, -10/8, 3/8).
        tail = sched[-1] if len(set(sched)) == 1 else FIXED_POINT_QUINTIC
        sched = tuple(sched[:steps]) + (tail,) * max(0, steps - len(sched))
    return tuple(sched), safety
