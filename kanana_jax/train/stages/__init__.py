"""Training stages: each supplies a pure loss function `loss_fn(model, params, batch, cfg) -> (loss, aux)`.

`aux` is a dict with 'metrics' (scalars) and 'intermediates' (the model's sown statistics).
"""
from kanana_jax.train.stages import pretrain

STAGES = {"pretrain": pretrain}


def get_stage(name: str):
    if name not in STAGES:
        raise ValueError(f"train.stage={name!r}; allowed values: {', '.join(STAGES)}")
    return STAGES[name]
