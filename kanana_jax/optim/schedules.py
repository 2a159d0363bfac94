"""Learning-rate schedules: constant, cosine, and warmup-stable-decay (WSD), each with linear warmup."""
from __future__ import annotations

import optax

from kanana_jax.config import OptimizerConfig


def make_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """lr(step) for `total_steps`; min_lr_ratio sets the floor of cosine and WSD decays."""
    peak, warmup = cfg.learning_rate, min(cfg.warmup_steps, max(total_steps - 1, 0))
    floor = peak * cfg.min_lr_ratio
    warm = optax.linear_schedule(0.0, peak, warmup) if warmup else optax.constant_schedule(peak)
    rest = max(total_steps - warmup, 1)
    if cfg.schedule == "constant":
        main = optax.constant_schedule(peak)
    elif cfg.schedule == "cosine":
        main = optax.cosine_decay_schedule(peak, rest, alpha=cfg.min_lr_ratio)
    else:  # wsd: hold the peak, then decay linearly over the last `decay_fraction` of steps
        decay = max(int(rest * cfg.decay_fraction), 1)
        main = optax.join_schedules([optax.constant_schedule(peak), optax.linear_schedule(peak, floor, decay)],
                                    [rest - decay])
    return optax.join_schedules([warm, main], [warmup]) if warmup else main
