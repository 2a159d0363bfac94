"""Cloud TPU slice names -> chips, physical topology, hosts and per-chip HBM, for AOT compiles and launchers.

Names follow Cloud TPU accelerator types: v4 and v5p names count TensorCores (2 per chip, used as one
'megacore' device), so v5p-128 is 64 chips in a 4x4x4 torus; v5e (v5litepod) and v6e names count chips.
`python -m launch.topologies` prints the table.
"""
from __future__ import annotations

import dataclasses
import re

GiB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Generation:
    """One TPU generation: naming, chip memory and peak, host layout, and its Cloud / GKE names."""
    name: str                    # our name: v4, v5e, v5p, v6e
    type_prefix: str             # Cloud accelerator-type prefix: v4, v5litepod, v5p, v6e
    jax_name: str                # topology prefix for jax.experimental.topologies: v4, v5e, v5p, v6e
    cores_per_chip_in_name: int  # 2: the slice name counts TensorCores; 1: it counts chips
    hbm_bytes: int               # per chip, usable: what the TPU compiler (libtpu 0.0.48) reports as available
    peak_bf16_flops: float       # per chip
    chips_per_host: int          # on multi-host slices
    gke_accelerator: str         # GKE node selector value (xpk)
    runtime_version: str         # gcloud tpu-vm --version
    zones: tuple                 # zones that offer this generation (Cloud TPU docs; --skip-zone-check to bypass)
    shapes: dict                 # chips -> physical topology (x, y[, z])


_CUBE = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8), 256: (4, 8, 8),
         512: (8, 8, 8), 1024: (8, 8, 16), 2048: (8, 16, 16), 4096: (16, 16, 16)}
_PLANE = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}

GENERATIONS = {
    "v4": Generation("v4", "v4", "v4", 2, int(30.75 * GiB), 275e12, 4, "tpu-v4-podslice", "tpu-ubuntu2204-base",
                     ("us-central2-b",), {c: s for c, s in _CUBE.items() if c <= 2048}),
    "v5e": Generation("v5e", "v5litepod", "v5e", 1, int(15.75 * GiB), 197e12, 4, "tpu-v5-lite-podslice",
                      "v2-alpha-tpuv5-lite", ("us-central1-a", "us-east1-c", "us-east5-a", "us-east5-b",
                                              "us-south1-a", "us-west1-c", "us-west4-a", "europe-west4-b"),
                      dict(_PLANE)),
    "v5p": Generation("v5p", "v5p", "v5p", 2, int(95.73 * GiB), 459e12, 4, "tpu-v5p-slice", "v2-alpha-tpuv5",
                      ("us-central1-a", "us-east5-a", "europe-west4-b"), dict(_CUBE)),
    "v6e": Generation("v6e", "v6e", "v6e", 1, int(31.24 * GiB), 918e12, 4, "tpu-v6e-slice", "v2-alpha-tpuv6e",
                      ("us-central2-b", "us-east1-d", "us-east5-a", "us-east5-b", "europe-west4-a",
                       "asia-northeast1-b", "southamerica-west1-a"), dict(_PLANE)),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v4": "v4", "v5e": "v5e", "v5p": "v5p", "v6e": "v6e"}


@dataclasses.dataclass(frozen=True)
class Slice:
    """A named TPU slice (possibly several, joined over DCN)."""
    generation: Generation
    chips: int
    shape: tuple
    num_slices: int = 1

    @property
    def name(self) -> str:
        """Cloud accelerator type of one slice, e.g. 'v5p-128', 'v5litepod-16'."""
        return f"{self.generation.type_prefix}-{self.chips * self.generation.cores_per_chip_in_name}"

    @property
    def topology(self) -> str:
        """Physical topology 'AxBxC' of one slice."""
        return "x".join(map(str, self.shape))

    @property
    def jax_topology_name(self) -> str:
        return f"{self.generation.jax_name}:{self.topology}"

    @property
    def hosts(self) -> int:
        """Hosts (VMs) per slice."""
        single = self.chips <= (8 if len(self.shape) == 2 else 4)
        return 1 if single else self.chips // self.generation.chips_per_host

    @property
    def chips_per_host_bounds(self) -> tuple:
        if self.hosts == 1:
            return tuple(self.shape) + (1,) * (3 - len(self.shape))
        return (2, 2, 1)

    @property
    def total_chips(self) -> int:
        return self.chips * self.num_slices


def parse(name: str, num_slices: int = 1) -> Slice:
    """'v5p-128' | 'v5litepod-16' | 'v5e-16' | 'v6e-256' | 'v4-32' -> Slice; clear errors for anything else."""
    allowed = ", ".join(f"{g.type_prefix}-N" for g in GENERATIONS.values())
    m = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v5lite|v6e)-(\d+)", name.strip().lower())
    if not m:
        raise ValueError(f"unknown TPU topology {name!r}; expected one of {allowed} (e.g. v5p-128, v6e-256)")
    gen = GENERATIONS[_ALIASES[m.group(1)]]
    count = int(m.group(2))
    if count % gen.cores_per_chip_in_name:
        raise ValueError(f"{name!r}: {gen.name} names count TensorCores (2 per chip); use an even number")
    chips = count // gen.cores_per_chip_in_name
    if chips not in gen.shapes:
        sizes = ", ".join(f"{gen.type_prefix}-{c * gen.cores_per_chip_in_name}" for c in sorted(gen.shapes))
        raise ValueError(f"{name!r} is not a {gen.name} slice size; available: {sizes}")
    if num_slices < 1:
        raise ValueError(f"num_slices must be >= 1, got {num_slices}")
    return Slice(gen, chips, gen.shapes[chips], num_slices)


def check_zone(gen: Generation, zone: str, skip: bool = False) -> str:
    """Returns `zone` if it is well formed and offers `gen` (unless `skip`); raises naming the valid zones."""
    if not re.fullmatch(r"[a-z]+-[a-z]+\d+-[a-z]", zone or ""):
        raise ValueError(f"zone {zone!r} is not a Google Cloud zone name like 'us-east5-a'")
    if not skip and zone not in gen.zones:
        raise ValueError(f"zone {zone!r} does not offer TPU {gen.name} (known zones: {', '.join(gen.zones)}); "
                         "pick one of those or pass --skip-zone-check if Cloud added it since")
    return zone


def config_topology(spec: str) -> str:
    """The slice named by a config module's `topology(arg)` for 'path.py[:arg]'; raises if it has none."""
    from kanana_jax.cli import load_config_module
    path, _, arg = spec.partition(":")
    module = load_config_module(path)
    if not hasattr(module, "topology"):
        raise ValueError(f"{path} does not name a TPU slice (no topology(arg) function); pass --topology, "
                         "e.g. --topology v5p-128")
    return module.topology(arg or None)


def resolve(spec: str, topology: str | None, num_slices: int = 1) -> Slice:
    """The slice to use: `topology`, else the config's own; warns (stderr) when `topology` differs from the slice
    the config module lays its mesh and batch out for, since the config keeps that layout."""
    try:
        own = config_topology(spec)
    except ValueError:
        if topology is None:
            raise
        own = None
    if topology and own and parse(topology).name != parse(own).name:
        import sys
        print(f"note: {spec} lays out its mesh and batch for {own}; for {topology} the same layout is used "
              "(pass the slice in the config argument, e.g. slice=..., if the config has one)", file=sys.stderr)
    return parse(topology or own, num_slices)


def topology_devices(slice_: Slice):
    """Compile-only TPU devices of the slice(s) from libtpu, usable on a CPU-only machine."""
    from jax.experimental import topologies
    kwargs = dict(platform="tpu", topology_name=slice_.jax_topology_name,
                  chips_per_host_bounds=slice_.chips_per_host_bounds)
    if slice_.generation.cores_per_chip_in_name == 2:
        kwargs["chip_config_name"] = "megacore"
    if slice_.num_slices > 1:
        kwargs["num_slices"] = slice_.num_slices
    return topologies.get_topology_desc(**kwargs).devices


def main():
    print(f"{'name':<14}{'chips':>6}{'topology':>10}{'hosts':>6}{'HBM/chip':>10}")
    for gen in GENERATIONS.values():
        for chips in sorted(gen.shapes):
            s = Slice(gen, chips, gen.shapes[chips])
            print(f"{s.name:<14}{chips:>6}{s.topology:>10}{s.hosts:>6}{gen.hbm_bytes / GiB:>9.1f}G")


if __name__ == "__main__":
    main()
