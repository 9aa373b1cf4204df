"""Device mesh, the logical-axis rules table, and param shardings derived from abstract init.

The model names every param axis and activation axis logically ('embed', 'heads', 'batch', ...).
This file maps those names onto a 3-axis device mesh:

  data    pure data parallelism: params replicated, batch split.
  fsdp    fully-sharded data parallelism: batch split *and* params split along 'embed'
          (gathered just in time for each matmul by GSPMD).
  tensor  tensor (model) parallelism: heads, mlp and vocab split (Megatron style).

One rules table serves every layout; a mesh axis of size 1 simply shards nothing, so DP, FSDP and
FSDP+TP are just different `MeshConfig`s (see `MESH_PRESETS`).
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llamax.config import ModelConfig
from llamax.errors import ConfigError, check_field_types, check_int, is_int
from llamax.model.llama import abstract_params

logger = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

# Logical name -> mesh axis (or axes, or None = replicated). Order matters only when two logical
# names of one array map to the same mesh axis: flax gives the axis to the first one listed.
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # activations
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    # params
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("layers", None),
)

# Tensor parallelism must split whole attention heads; a fallback to replication would silently
# change the per-device work, so these raise instead.
_MUST_DIVIDE = ("heads", "kv_heads")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the ('data', 'fsdp', 'tensor') mesh axes.

    `data`, `fsdp`, `tensor` are the axis sizes *within one slice* (ICI: one TPU slice or one GPU
    node with NVLink). Exactly one of them may be -1, meaning "all remaining devices".

    `dcn_data`, `dcn_fsdp`, `dcn_tensor` describe multi-slice / multi-node training over the
    slower data-centre network (DCN): how many slices sit along each axis. The full mesh axis size
    is ici_size * dcn_size; e.g. 4 TPU slices of 256 chips with `fsdp=-1, dcn_data=4` gives
    data=4 (across slices) and fsdp=256 (within a slice). Keep tensor parallelism inside a slice
    (dcn_tensor=1): its collectives run once per layer. When any dcn_* > 1 the mesh is built with
    `mesh_utils.create_hybrid_device_mesh` (slices are TPU slices, or processes on GPU).
    """

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    dcn_data: int = 1
    dcn_fsdp: int = 1
    dcn_tensor: int = 1

    def __post_init__(self):
        check_field_types(self)
        ici = self.ici_shape
        for name, size in zip(MESH_AXES, ici):
            if size != -1 or not is_int(size):
                check_int(size, f"MeshConfig.{name}", 1, "or -1 for the remaining devices")
        if ici.count(-1) > 1:
            raise ConfigError(
                f"MeshConfig has -1 for more than one axis ({dict(zip(MESH_AXES, ici))}); "
                "at most one axis may take 'the rest of the devices'")
        for name, size in zip(MESH_AXES, self.dcn_shape):
            check_int(size, f"MeshConfig.dcn_{name}", 1)

    @property
    def ici_shape(self) -> tuple[int, int, int]:
        return (self.data, self.fsdp, self.tensor)

    @property
    def dcn_shape(self) -> tuple[int, int, int]:
        return (self.dcn_data, self.dcn_fsdp, self.dcn_tensor)

    @property
    def num_slices(self) -> int:
        return math.prod(self.dcn_shape)

    def resolve(self, num_devices: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        """Returns (ici_shape, dcn_shape) with -1 filled in for `num_devices` devices."""
        if num_devices % self.num_slices:
            raise ConfigError(
                f"{num_devices} devices cannot form {self.num_slices} slices "
                f"(dcn shape {self.dcn_shape}); the dcn_* sizes must multiply to a divisor of the "
                "device count")
        per_slice = num_devices // self.num_slices
        known = math.prod(size for size in self.ici_shape if size != -1)
        ici = self.ici_shape
        if -1 in ici:
            if per_slice % known:
                raise ConfigError(
                    f"mesh axes {dict(zip(MESH_AXES, ici))} do not divide the {per_slice} devices "
                    f"per slice ({num_devices} devices / {self.num_slices} slices); choose sizes "
                    f"whose product divides {per_slice}")
            ici = tuple(per_slice // known if size == -1 else size for size in ici)
        elif known != per_slice:
            raise ConfigError(
                f"mesh axes {dict(zip(MESH_AXES, ici))} hold {known} devices but there are "
                f"{per_slice} devices per slice ({num_devices} devices / {self.num_slices} slices); "
                "make the sizes multiply to the device count or set one axis to -1")
        return ici, self.dcn_shape


# Presets for the usual layouts; adjust sizes with dataclasses.replace(MESH_PRESETS[name], ...).
MESH_PRESETS: dict[str, MeshConfig] = {
    "dp": MeshConfig(data=-1, fsdp=1, tensor=1),
    "fsdp": MeshConfig(data=1, fsdp=-1, tensor=1),
    "fsdp_tp": MeshConfig(data=1, fsdp=-1, tensor=2),
}


def get_mesh_preset(name: str, **overrides: Any) -> MeshConfig:
    """Returns the named `MESH_PRESETS` entry with fields replaced by `overrides`."""
    if name not in MESH_PRESETS:
        raise ConfigError(f"unknown mesh preset {name!r}; known presets: {', '.join(MESH_PRESETS)}")
    return dataclasses.replace(MESH_PRESETS[name], **overrides)


def make_mesh(mesh_config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the ('data', 'fsdp', 'tensor') mesh over `devices` (default: all devices).

    Axis types are always Auto (GSPMD propagation from the logical constraints), never Explicit.
    """
    devices = list(jax.devices() if devices is None else devices)
    ici, dcn = mesh_config.resolve(len(devices))
    axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    if mesh_config.num_slices > 1:
        # TPU devices know their slice; on GPU (and CPU) each process is one node/granule.
        process_is_granule = not hasattr(devices[0], "slice_index")
        granules = {d.process_index if process_is_granule else d.slice_index for d in devices}
        if len(granules) != mesh_config.num_slices:
            raise ConfigError(
                f"MeshConfig dcn shape {dcn} asks for {mesh_config.num_slices} slices but the "
                f"devices form {len(granules)} {'processes' if process_is_granule else 'slices'}; "
                "set dcn_* to the number of slices (or 1 for a single slice/host)")
        device_array = mesh_utils.create_hybrid_device_mesh(
            ici, dcn, devices, process_is_granule=process_is_granule)
        return Mesh(device_array, MESH_AXES, axis_types=axis_types)
    shape = tuple(i * d for i, d in zip(ici, dcn))
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)


def mesh_axis_size(mesh: Mesh, axes: str | Sequence[str] | None) -> int:
    """Number of devices an array dim is split over when sharded along `axes`."""
    if axes is None:
        return 1
    if isinstance(axes, str):
        axes = (axes,)
    return math.prod(mesh.shape[axis] for axis in axes)


def data_parallel_size(mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> int:
    """How many ways the batch is split (data * fsdp with the default rules)."""
    return mesh_axis_size(mesh, nn.logical_to_mesh_axes(("batch",), rules)[0])


def check_batch_size(batch_size: int, mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> None:
    """Raises ConfigError unless `batch_size` splits evenly over the data-parallel devices."""
    dp = data_parallel_size(mesh, rules)
    if batch_size % dp:
        raise ConfigError(
            f"batch size {batch_size} is not divisible by the data-parallel size {dp} "
            f"(mesh data*fsdp = {dict(mesh.shape)}); use a global batch size that is a multiple "
            f"of {dp}")


def batch_sharding(mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> NamedSharding:
    """Sharding of the [batch, seq] arrays of a training batch."""
    return NamedSharding(mesh, nn.logical_to_mesh_axes(("batch", "length"), rules))


def to_global_batch(local_batch: dict[str, Any], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Places this process's rows of a [batch, seq] numpy batch on the mesh as global arrays.

    With one process `local_batch` is the whole batch; with several, each process passes its own
    contiguous slice of rows and the global batch is their concatenation in process order, so the
    leading axis of `sharding` must be split across processes in process order (as
    `batch_sharding` is). ConfigError when the rows do not split over the data-parallel devices
    (every caller: training, evaluation, scoring).
    """
    first = sharding.spec[0] if len(sharding.spec) else None
    axes = first if isinstance(first, tuple) else (first,) if first else ()
    dp = math.prod(sharding.mesh.shape[axis] for axis in axes)
    for value in local_batch.values():
        rows = np.shape(value)[0] * jax.process_count()
        if rows % dp:
            raise ConfigError(f"a batch of {rows} rows does not split over the {dp} data-parallel "
                              f"devices (mesh {dict(sharding.mesh.shape)}); use a batch size that "
                              f"is a multiple of {dp}")
    return {key: jax.make_array_from_process_local_data(sharding, value)
            for key, value in local_batch.items()}


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def logical_to_sharding(shape: Sequence[int], logical_axes: Sequence[str | None], mesh: Mesh,
                        rules: Rules = LOGICAL_AXIS_RULES, name: str = "array") -> NamedSharding:
    """NamedSharding for an array of `shape` whose dims carry `logical_axes`.

    A dim that its mesh axes do not divide falls back to replicated (logged), except attention
    heads, where uneven tensor parallelism raises ConfigError.
    """
    mesh_axes = nn.logical_to_mesh_axes(tuple(logical_axes), rules)
    spec = []
    for dim, logical, axes in zip(shape, logical_axes, mesh_axes):
        size = mesh_axis_size(mesh, axes)
        if dim % size == 0:
            spec.append(axes)
            continue
        if logical in _MUST_DIVIDE:
            raise ConfigError(
                f"{name}: {logical}={dim} is not divisible by the mesh size {size} of {axes!r}; "
                "tensor parallelism splits whole attention heads, so the tensor size must divide "
                "both num_heads and num_kv_heads. Choose a smaller MeshConfig.tensor "
                f"(e.g. a divisor of {dim})")
        logger.warning("%s: dim %s=%d is not divisible by mesh axes %r (size %d); replicating it",
                       name, logical, dim, axes, size)
        spec.append(None)
    return NamedSharding(mesh, PartitionSpec(*spec))


def check_heads_divisible(config: ModelConfig, mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> None:
    """Raises ConfigError unless the mesh axes of 'heads'/'kv_heads' divide their counts."""
    for logical, count in (("heads", config.num_heads), ("kv_heads", config.num_kv_heads)):
        axes = nn.logical_to_mesh_axes((logical,), rules)[0]
        size = mesh_axis_size(mesh, axes)
        if count % size:
            divisors = [d for d in range(1, count + 1) if config.num_kv_heads % d == 0
                        and config.num_heads % d == 0]
            raise ConfigError(
                f"num_{logical}={count} is not divisible by the tensor-parallel size {size} "
                f"(mesh axes {axes!r}); tensor parallelism splits whole attention heads. Use a "
                f"MeshConfig.tensor that divides num_heads={config.num_heads} and "
                f"num_kv_heads={config.num_kv_heads}: one of {divisors}")


def tree_shardings(abstract: Any, logical_axes: Any, mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> Any:
    """NamedSharding of every leaf of `abstract` (ShapeDtypeStructs) from its logical axis names
    (a pytree of PartitionSpecs of the same structure): params, LoRA adapters alike."""
    is_spec = lambda x: isinstance(x, PartitionSpec)  # noqa: E731
    flat_logical, treedef = jax.tree_util.tree_flatten_with_path(logical_axes, is_leaf=is_spec)
    shardings = [
        logical_to_sharding(leaf.shape, tuple(spec), mesh, rules, name=jax.tree_util.keystr(path))
        for (path, spec), leaf in zip(flat_logical, treedef.flatten_up_to(abstract))
    ]
    return jax.tree_util.tree_unflatten(treedef, shardings)


def param_shardings(config: ModelConfig, mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> Any:
    """NamedSharding of every param (same pytree as `init_params`), from abstract init only.

    Raises ConfigError when tensor parallelism does not divide num_heads and num_kv_heads.
    """
    check_heads_divisible(config, mesh, rules)
    return tree_shardings(*abstract_params(config), mesh, rules)


def param_partition_specs(config: ModelConfig, mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> Any:
    """The PartitionSpecs of `param_shardings` (what the golden test pins)."""
    return jax.tree.map(lambda s: s.spec, param_shardings(config, mesh, rules))

