"""Causal attention through Pallas' TPU splash-attention kernel (`attention_impl='splash'`).

The kernel (`jax.experimental.pallas.ops.tpu.splash_attention`) is a block-sparse flash
attention: it walks [block_q, block_kv] tiles, skips the tiles the causal mask hides and never
holds a [seq, seq] score matrix, so per-chip memory grows linearly with the sequence and the
compiled program stays one kernel per layer (the XLA path unrolls seq / block query blocks).
Segment ids keep packed documents apart inside the kernel (a key is seen only by queries of the
same segment; 0 = padding sees only padding, as in the XLA path's mask). GQA is native: query
head h reads kv head h // (heads / kv_heads), the grouping `_attend_dense` uses, so k and v are
never repeated.

Sharding: the kernel runs per device inside `jax.shard_map` over the mesh of the surrounding
jit (`jax.sharding.get_abstract_mesh()`), split over batch ('batch' logical axis) and heads
('act_heads' / 'act_kv_heads'), with the whole sequence on every device. Tensor parallelism
splits q heads and kv heads into equal contiguous ranges, which keeps every query head with its
kv head. Outside any mesh the kernel is called directly.

Where it runs: compiled by Mosaic when the mesh's devices are TPUs (including the compile-only
devices of `llamax.train.aot`); anywhere else it runs in Pallas interpret mode (plain XLA ops,
slow), which is how the tests check it against the XLA path on CPU.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash

Array = jax.Array

# Tile sizes tried largest first (MaxText's default is 512); the kernel needs the sequence to be a
# multiple of the tile, and TPU tiles must be multiples of 128 lanes.
TILE_SIZES = (512, 256, 128)
PAD_SEGMENT = -1  # segment id of the padding up to a whole tile (real ids are >= 0)
# The same logical names as the model's activations (llama.ACT_HEADS / ACT_KV_HEADS): the
# sequence stays whole on every device, since the kernel cannot split keys.
_Q_AXES = ("batch", None, "act_heads", None)
_KV_AXES = ("batch", None, "act_kv_heads", None)


def splash_attention(q: Array, k: Array, v: Array, segment_ids: Array) -> Array:
    """softmax(q k^T / sqrt(d)) v, causal within each segment, via the splash kernel.

    q [batch, seq, heads, head_dim]; k, v [batch, seq, kv_heads, head_dim];
    segment_ids [batch, seq] int32. Returns [batch, seq, heads, head_dim] in q's dtype.
    Any seq works: it is padded up to a multiple of 128 (the kernel's smallest tile) with a
    segment id of its own, which no real token can see.
    """
    seq, head_dim = q.shape[1], q.shape[3]
    # The kernel does not scale its logits: fold 1/sqrt(d) into q (in float32, then back).
    q = (q.astype(jnp.float32) * head_dim ** -0.5).astype(q.dtype)
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    padding = -seq % TILE_SIZES[-1]
    if padding:
        q, k, v = (jnp.pad(x, ((0, 0), (0, padding), (0, 0), (0, 0))) for x in (q, k, v))
        segment_ids = jnp.pad(segment_ids, ((0, 0), (0, padding)), constant_values=PAD_SEGMENT)
    mesh = jax.sharding.get_abstract_mesh()
    interpret = _platform(mesh) != "tpu"
    if mesh.empty:
        return _attend_local(q, k, v, segment_ids, interpret)[:, :seq]

    q_spec, kv_spec = _partition_spec(_Q_AXES), _partition_spec(_KV_AXES)
    segment_spec = jax.sharding.PartitionSpec(q_spec[0], None)
    # check_vma=False: pallas_call carries no varying-manual-axes rule for its outputs.
    local = jax.shard_map(functools.partial(_attend_local, interpret=interpret), mesh=mesh,
                          in_specs=(q_spec, kv_spec, kv_spec, segment_spec), out_specs=q_spec,
                          check_vma=False)
    return local(q, k, v, segment_ids)[:, :seq]


def _attend_local(q: Array, k: Array, v: Array, segment_ids: Array, interpret: bool) -> Array:
    """The kernel over this device's rows and heads; q is already scaled."""
    _, seq, heads, _ = q.shape
    kernel = _kernel(seq, heads, interpret)

    def one_row(q, k, v, segments):  # q [seq, heads, head_dim]; k, v [seq, kv_heads, head_dim]
        out = kernel(q.swapaxes(0, 1), k.swapaxes(0, 1), v.swapaxes(0, 1),  # heads major
                     segment_ids=splash.SegmentIds(q=segments, kv=segments))
        return out.swapaxes(0, 1)  # [seq, heads, head_dim]

    return jax.vmap(one_row)(q, k, v, segment_ids)


def _kernel(seq: int, heads: int, interpret: bool):
    """The causal splash kernel for one row of `heads` heads. Built on every trace, not cached:
    it holds its block-mask tables as arrays, which inside a trace are tracers of that trace."""
    tile = next(size for size in TILE_SIZES if seq % size == 0)
    blocks = splash.BlockSizes(block_q=tile, block_kv=tile, block_kv_compute=tile,
                               block_q_dkv=tile, block_kv_dkv=tile, block_kv_dkv_compute=tile,
                               block_q_dq=tile, block_kv_dq=tile)
    mask = splash.MultiHeadMask([splash.CausalMask((seq, seq)) for _ in range(heads)])
    # head_shards=q_seq_shards=1: shard_map already hands this kernel only its own heads.
    return splash.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1,
                                  interpret=interpret)


def _partition_spec(logical: tuple[str | None, ...]) -> jax.sharding.PartitionSpec:
    """Mesh axes of `logical` under the current logical-axis rules (none: replicated)."""
    return jax.sharding.PartitionSpec(*nn.logical_to_mesh_axes(logical))


def _platform(mesh: jax.sharding.AbstractMesh) -> str:
    """The platform this program is being built for: the mesh's devices, else the default."""
    device = None if mesh.empty else mesh.abstract_device
    return device.platform if device is not None else jax.default_backend()
