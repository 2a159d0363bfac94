"""A small sweep language: `param`, `fixed`, `product`, `chain`, `zipit` build an ordered list of override dicts.

    from experiments.sweep_dsl import chain, fixed, param, product, zipit

    sweep = product(param("optimizer.name", ["adamw", "muon"]),
                    param("optimizer.learning_rate", [1e-3, 3e-3]))
    sweep.points   # ({'optimizer.name': 'adamw', 'optimizer.learning_rate': 0.001}, ...) - 4 points

Each point is a dict of dotted config keys to values, applied to `get_config(arg)` with
`kanana_jax.config.apply_overrides` and validated by `kanana_jax.config.load`; `validate` does that for
every point and names the first bad point and key. Ordering: `product` varies its last argument fastest
(like nested for-loops), `chain` concatenates, `zipit` pairs points up position by position.
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
from typing import Any, Callable, Iterable, Mapping, Sequence

from kanana_jax import config as config_lib


@dataclasses.dataclass(frozen=True)
class Sweep:
    """An ordered, immutable tuple of points (dicts of dotted config key -> value)."""
    points: tuple

    def __iter__(self):
        return (dict(p) for p in self.points)

    def __len__(self) -> int:
        return len(self.points)

    def __getitem__(self, i: int) -> dict:
        return dict(self.points[i])

    def __add__(self, other) -> "Sweep":
        return chain(self, other)

    def __mul__(self, other) -> "Sweep":
        return product(self, other)

    @property
    def keys(self) -> list[str]:
        """Every key any point sets, in first-seen order."""
        return list(dict.fromkeys(k for p in self.points for k in p))


def as_sweep(obj) -> Sweep:
    """A Sweep from a Sweep, a dict (one point) or an iterable of dicts; anything else raises TypeError."""
    if isinstance(obj, Sweep):
        return obj
    if isinstance(obj, Mapping):
        return fixed(obj)
    if isinstance(obj, (str, bytes)) or not isinstance(obj, Iterable):
        raise TypeError(f"a sweep must be a Sweep, a dict or a list of dicts of dotted keys, got {obj!r}")
    points = []
    for i, p in enumerate(obj):
        if not isinstance(p, Mapping):
            raise TypeError(f"sweep point {i} must be a dict of dotted config keys, got {p!r}")
        points.append(_point(p))
    return Sweep(tuple(points))


def _point(mapping: Mapping) -> dict:
    for key in mapping:
        if not isinstance(key, str) or not key or any(not part for part in key.split(".")):
            raise ValueError(f"sweep key {key!r} is not a dotted config key like 'optimizer.learning_rate'")
    return dict(mapping)


def param(key: str, values: Sequence[Any]) -> Sweep:
    """One point per value of one dotted key, in the given order."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise TypeError(f"param({key!r}, values): values must be a list or tuple, got {values!r}")
    values = list(values)
    if not values:
        raise ValueError(f"param({key!r}, values): values is empty; give at least one value")
    return Sweep(tuple(_point({key: v}) for v in values))


def fixed(overrides: Mapping[str, Any]) -> Sweep:
    """A single point setting every key in `overrides` (multiply with it to set keys shared by a group)."""
    return Sweep((_point(overrides),))


def _merge(parts: Sequence[dict], where: str) -> dict:
    out = {}
    for p in parts:
        clash = sorted(set(out) & set(p))
        if clash:
            raise ValueError(f"{where}: key '{clash[0]}' is set by more than one argument "
                             f"({out[clash[0]]!r} and {p[clash[0]]!r}); each key may come from one argument only")
        out.update(p)
    return out


def product(*sweeps) -> Sweep:
    """Cartesian product; the last argument varies fastest. Two arguments may not set the same key."""
    if not sweeps:
        raise ValueError("product() needs at least one sweep")
    parts = [as_sweep(s).points for s in sweeps]
    return Sweep(tuple(_merge(combo, "product") for combo in itertools.product(*parts)))


def chain(*sweeps) -> Sweep:
    """All points of the first sweep, then the second's, and so on (points may set different keys)."""
    return Sweep(tuple(p for s in sweeps for p in as_sweep(s).points))


def zipit(*sweeps) -> Sweep:
    """Point i merges point i of every argument; all arguments must have the same number of points."""
    if not sweeps:
        raise ValueError("zipit() needs at least one sweep")
    parts = [as_sweep(s).points for s in sweeps]
    sizes = [len(p) for p in parts]
    if len(set(sizes)) != 1:
        raise ValueError(f"zipit: arguments have different numbers of points {sizes}; zip needs equal lengths "
                         "(use product for every combination)")
    return Sweep(tuple(_merge(combo, "zipit") for combo in zip(*parts)))


def resolve(get_config: Callable, arg: str | None, point: Mapping[str, Any],
            base: Mapping[str, Any] | None = None):
    """(ConfigDict, validated ExperimentConfig) of `get_config(arg)` with `base` then `point` applied."""
    config_dict = get_config(arg)
    config_lib.apply_overrides(config_dict, dict(base or {}))
    config_lib.apply_overrides(config_dict, dict(point))
    return config_dict, config_lib.load(config_dict)


def validate(sweep, get_config: Callable, arg: str | None = None,
             base: Mapping[str, Any] | None = None) -> list:
    """Validated ExperimentConfigs, one per point; a bad key or value raises ConfigError naming the point."""
    sweep = as_sweep(sweep)
    if not len(sweep):
        raise ValueError("the sweep has no points")
    if base:
        try:
            config_lib.apply_overrides(get_config(arg), dict(base))
        except config_lib.ConfigError as e:
            raise config_lib.ConfigError(f"override shared by every sweep point: {e}") from e
    out = []
    for i, point in enumerate(sweep):
        try:
            out.append(resolve(get_config, arg, point, base)[1])
        except config_lib.ConfigError as e:
            raise config_lib.ConfigError(f"sweep point {i} {point}: {e}") from e
    return out


def expand(sweep, get_config: Callable, arg: str | None = None) -> list[dict]:
    """The points of `sweep` as override dicts after checking every one against `get_config(arg)`."""
    sweep = as_sweep(sweep)
    validate(sweep, get_config, arg)
    return [copy.deepcopy(p) for p in sweep]
