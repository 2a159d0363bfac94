"""Advantages for the RL learner, on the host (numpy, float64): GRPO group-relative advantages, per-track
normalization, PPO's generalized advantage estimation, and the adaptive KL coefficient.

GRPO (Shao et al. 2024): each prompt's G samples form a group; A_i = r_i - mean(r_group), divided by the
group's std (+ eps) when `std_normalize` (Dr. GRPO drops that division). A group whose rewards are all equal
gets A = 0 (no signal).
Per-track normalization: with several tracks in one batch (Chat: reward-model scores on their own scale;
Logic: 0/1 verdicts), each track's advantages are divided by that track's std over the batch (and centred), so
neither track dominates the update by the scale of its reward.
GAE (Schulman et al. 2016): delta_t = r_t + gamma V_{t+1} - V_t, A_t = sum_k (gamma lambda)^k delta_{t+k} over
the response's tokens in order (V after the last token = 0); returns = A + V.
Adaptive KL (Ziegler et al. 2019): coef *= 1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon.
"""
from __future__ import annotations

import numpy as np

EPS = 1e-6


def group_advantages(rewards_PxG: np.ndarray, valid_PxG: np.ndarray | None = None,
                     std_normalize: bool = True) -> np.ndarray:
    """[P, G] group-relative advantages over the valid samples of each group (invalid ones get 0)."""
    r = np.asarray(rewards_PxG, np.float64)
    valid = np.ones_like(r, bool) if valid_PxG is None else np.asarray(valid_PxG, bool)
    n = np.maximum(valid.sum(1, keepdims=True), 1)
    mean = np.where(valid, r, 0.0).sum(1, keepdims=True) / n
    adv = np.where(valid, r - mean, 0.0)
    if std_normalize:
        var = np.where(valid, (r - mean) ** 2, 0.0).sum(1, keepdims=True) / n
        adv = adv / (np.sqrt(var) + EPS)
    return adv


def normalize_per_track(adv: np.ndarray, track_of_rows: np.ndarray, valid: np.ndarray, center: bool = True):
    """`adv` with each track's valid entries centred (optionally) and scaled to unit std over the batch; a track
    with no spread stays as it is. `track_of_rows` has adv's leading shape."""
    adv = np.asarray(adv, np.float64).copy()
    valid = np.asarray(valid, bool)
    for t in np.unique(track_of_rows):
        sel = (track_of_rows == t) & valid
        if sel.sum() < 2:
            continue
        x = adv[sel]
        if center:
            x = x - x.mean()
        std = x.std()
        adv[sel] = x / std if std > EPS else x
    return adv


def gae(rewards_N: np.ndarray, values_N: np.ndarray, gamma: float, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """(advantages [N], returns [N]) of one response's N tokens in order."""
    r, v = np.asarray(rewards_N, np.float64), np.asarray(values_N, np.float64)
    adv = np.zeros_like(r)
    running = 0.0
    for t in range(len(r) - 1, -1, -1):
        next_v = v[t + 1] if t + 1 < len(r) else 0.0
        running = r[t] + gamma * next_v - v[t] + gamma * lam * running
        adv[t] = running
    return adv, adv + v


def adaptive_kl(coef: float, kl: float, target: float, horizon: int, n_steps: int = 1) -> float:
    """The next KL coefficient of the adaptive controller."""
    error = float(np.clip(kl / max(target, EPS) - 1.0, -0.2, 0.2))
    return coef * (1.0 + error * n_steps / max(horizon, 1))
