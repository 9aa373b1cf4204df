"""TPU pod slices by name (v4-32, v5e-16, v5p-128, v6e-256) as compile-only devices on any host.

With libtpu installed (`pip install 'llamax[tpu]'`), `jax.experimental.topologies` describes a
real slice without its chips: its devices have the true device kind, coordinates, hosts and
slices, and `jit(...).lower(...).compile()` runs libtpu's own TPU compiler for them. Nothing can
execute on them; they exist to compile, measure memory and read the optimized HLO.

Slice names follow Cloud TPU: v4-N and v5p-N count TensorCores (two per chip, one JAX device per
chip: v5p-128 is 64 chips), v5e-N and v6e-N count chips. Topology shapes are MaxText's table.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import re

import jax

from llamax.errors import ConfigError

LIBTPU_INSTALL_HINT = "pip install 'llamax[tpu]'  (or: pip install 'jax[tpu]==0.10.2')"


@dataclasses.dataclass(frozen=True)
class Generation:
    """One TPU generation: how its slices are laid out and what each chip offers."""

    topology_prefix: str  # the generation in libtpu's topology names: 'v5' in 'v5:4x4x4'
    device_kind: str  # jax's `device.device_kind` for its chips
    cores_per_chip: int  # TensorCores per chip that the slice name counts (megacore: 2)
    hbm_bytes: int  # HBM per chip that the compiler may use (its "available HBM")
    shapes: dict[int, tuple[int, ...]]  # chips -> torus shape


def _gib(gib: float) -> int:
    return round(gib * 2 ** 30)


# 3D tori (v4, v5p) and 2D ones (v5e, v6e), by chip count; MaxText's accelerator table.
_TORUS_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4),
             128: (4, 4, 8), 192: (4, 4, 12), 256: (4, 8, 8), 384: (4, 8, 12), 512: (8, 8, 8),
             768: (8, 8, 12), 1024: (8, 8, 16), 1536: (8, 12, 16), 2048: (8, 16, 16),
             3072: (12, 16, 16), 4096: (16, 16, 16), 6144: (16, 16, 24)}
_TORUS_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16),
             256: (16, 16)}

# HBM is the compiler's own limit per chip ("exceeds available HBM (15.75G)"), measured with
# libtpu 0.0.42.1; the spec-sheet figures are 32 GiB (v4, v6e), 16 GiB (v5e), 95 GiB (v5p).
GENERATIONS: dict[str, Generation] = {
    "v4": Generation("v4", "TPU v4", 2, _gib(30.75), _TORUS_3D),
    "v5p": Generation("v5", "TPU v5", 2, _gib(95.74), _TORUS_3D),
    "v5e": Generation("v5e", "TPU v5 lite", 1, _gib(15.75), _TORUS_2D),
    "v6e": Generation("v6e", "TPU v6 lite", 1, _gib(31.25), _TORUS_2D),
}
_ALIASES = {"v5litepod": "v5e"}


@dataclasses.dataclass(frozen=True)
class Topology:
    """One slice type, e.g. `Topology.parse('v5p-128')`: 64 chips of 'TPU v5' as 4x4x4."""

    name: str  # as given, normalized: 'v5p-128'
    generation: str  # 'v5p'
    num_chips: int  # per slice; one JAX device per chip

    @classmethod
    def parse(cls, name: str) -> "Topology":
        """'v5p-128', 'v5e-16', 'v5litepod-16', 'v4-32', 'v6e-256'; ConfigError listing the
        known sizes otherwise."""
        match = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", name.strip().lower())
        if not match:
            raise ConfigError(f"unknown TPU topology {name!r}; expected <generation>-<size> with "
                              f"generation one of {sorted(GENERATIONS)}, e.g. v5p-128 or v5e-16")
        generation = _ALIASES.get(match.group(1), match.group(1))
        spec = GENERATIONS[generation]
        size = int(match.group(2))
        chips, remainder = divmod(size, spec.cores_per_chip)
        if remainder or chips not in spec.shapes:
            known = ", ".join(f"{generation}-{c * spec.cores_per_chip}" for c in sorted(spec.shapes))
            raise ConfigError(f"no {generation} slice of size {size}; known sizes: {known}")
        return cls(f"{generation}-{size}", generation, chips)

    @property
    def spec(self) -> Generation:
        return GENERATIONS[self.generation]

    @property
    def shape(self) -> tuple[int, ...]:
        return self.spec.shapes[self.num_chips]

    @property
    def topology_name(self) -> str:
        """libtpu's name: 'v5:4x4x4'."""
        return f"{self.spec.topology_prefix}:{'x'.join(map(str, self.shape))}"

    @property
    def chips_per_host_bounds(self) -> tuple[int, int, int]:
        """Chips per host along each axis: 2x2 per host, except single-host 8-chip v5e/v6e."""
        if len(self.shape) == 2 and self.num_chips <= 8:
            return (*self.shape, 1)
        return (2, 2, 1)

    @property
    def hbm_bytes(self) -> int:
        return self.spec.hbm_bytes


def configure_compile_only_host(topology: Topology) -> None:
    """Sets up this process for compiling TPU programs on a host without TPU chips.

    Call before JAX initializes its backends (the first `jax.devices()`). Environment variables
    are only set when unset: TPU_SKIP_MDS_QUERY and the TPU_* worker variables stop libtpu from
    probing the GCE metadata server for a TPU that is not there, and ALLOW_MULTIPLE_LIBTPU_LOAD
    lets two such processes (parallel tests, a sweep of compiles) load libtpu at once, since no
    chip is locked. Unless the user chose platforms (JAX_PLATFORMS), JAX's default backend, where
    any concrete array would live, becomes the CPU: JAX reads JAX_PLATFORMS when it is imported,
    so this sets its config instead.
    """
    for name, value in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_ACCELERATOR_TYPE", topology.name),
                        ("TPU_WORKER_HOSTNAMES", "localhost"), ("TPU_WORKER_ID", "0"),
                        ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):
        os.environ.setdefault(name, value)
    from jax._src import xla_bridge  # private, but the only way to ask without initializing

    if jax.config.jax_platforms is None and not xla_bridge.backends_are_initialized():
        jax.config.update("jax_platforms", "cpu")


def libtpu_version() -> str | None:
    """The installed libtpu's version, or None without it."""
    from importlib import metadata

    for distribution in ("libtpu", "libtpu-nightly"):
        try:
            return metadata.version(distribution)
        except metadata.PackageNotFoundError:
            continue
    return None


def compile_only_devices(topology: Topology, num_slices: int = 1) -> list[jax.Device]:
    """The devices of `num_slices` slices of `topology`, for `jit(...).lower(...).compile()`.

    Raises ConfigError naming the install command when libtpu is missing.
    """
    if importlib.util.find_spec("libtpu") is None:
        raise ConfigError(f"compiling for {topology.name} needs libtpu (TPU's compiler), which is "
                          f"not installed: {LIBTPU_INSTALL_HINT}")
    if not isinstance(num_slices, int) or num_slices < 1:
        raise ConfigError(f"num_slices must be a positive integer, got {num_slices!r}")
    from jax.experimental import topologies

    configure_compile_only_host(topology)
    chip_config = "megacore" if topology.spec.cores_per_chip == 2 else "default"
    description = topologies.get_topology_desc(
        platform="tpu", topology_name=topology.topology_name, chip_config_name=chip_config,
        chips_per_host_bounds=topology.chips_per_host_bounds, num_slices=num_slices)
    return list(description.devices)
