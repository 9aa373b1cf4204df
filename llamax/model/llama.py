"""The LLaMA decoder in Flax linen, functional: `Llama(config).apply({'params': p}, tokens)`.

Parameter names mirror HF (`embed_tokens`, `layers`, `self_attn/q_proj`, `mlp/gate_proj`,
`input_layernorm`, `post_attention_layernorm`, `norm`, `lm_head`) so conversion is a table.
Projection kernels keep heads as their own axis ([embed, heads, head_dim]) so tensor parallelism
splits whole heads and the rules table can name them.

LoRA: pass adapters as a second variable collection, `apply({'params': p, 'lora': adapters}, ...)`
(see `llamax.model.lora`); every Projection that finds `lora_a`/`lora_b` there adds their low-rank term.

Weight-only int8: `apply({'params': int8_params, 'quant': scales}, ...)` (see `llamax.model.quantize`);
a Projection (or the tied embedding) that finds `scale` there multiplies its output columns by it.

Logical axis names. Params: vocab, embed, heads, kv_heads, head_dim, mlp, norm (+ layers when
scanned). Activations use their own names (act_*) because a param axis that is sharded for FSDP
(embed) must stay whole in activations; `llamax.sharding` maps both to mesh axes.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from llamax.config import ModelConfig
from llamax.model.attention import attend
from llamax.model.kv_cache import KVCache, update_and_attend, write_at
from llamax.model.matmul import builds_for_cpu, out_in_shape, project, project_out_in
from llamax.model.rope import apply_rotary, inverse_frequencies, rotary_cos_sin

Array = jax.Array

ACT_EMBED = ("batch", "length", "act_embed")
ACT_HEADS = ("batch", "length", "act_heads", "head_dim")
ACT_KV_HEADS = ("batch", "length", "act_kv_heads", "head_dim")
ACT_MLP = ("batch", "length", "act_mlp")
ACT_VOCAB = ("batch", "length", "act_vocab")
LORA_COLLECTION = "lora"  # variable collection of LoRA adapters; absent = the plain model
QUANT_COLLECTION = "quant"  # per-output-column scales of int8 kernels; absent = unquantized
# Projection name -> number of leading input (contracted) axes of its kernel [inputs..., outputs...].
KERNEL_INPUT_AXES = {"q_proj": 1, "k_proj": 1, "v_proj": 1, "o_proj": 2,  # o_proj: [heads, head_dim, embed]
                     "gate_proj": 1, "up_proj": 1, "down_proj": 1, "lm_head": 1}


def _init(config: ModelConfig):
    return nn.initializers.normal(stddev=config.initializer_range)


class RMSNorm(nn.Module):
    """RMSNorm with the variance in float32, as HF computes it."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        weight = self.param("weight", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                            (x.shape[-1],), self.config.weight_dtype)
        x32 = x.astype(jnp.float32)
        variance = jnp.mean(x32 * x32, axis=-1, keepdims=True)
        normed = (x32 * jax.lax.rsqrt(variance + self.config.rms_norm_eps)).astype(self.config.compute_dtype)
        return weight.astype(self.config.compute_dtype) * normed


class Projection(nn.Module):
    """A bias-free linear map whose kernel keeps named axes: y = einsum(equation, x, kernel).

    Kernels are laid out [inputs..., outputs...], or (kernel_layout 'out_in', CPU decoding) as
    one [outputs, inputs] matrix, made from the first by `kernels_out_in`. With LoRA adapters in
    the `lora` collection (lora_a [inputs..., rank], lora_b [rank, outputs...], already scaled
    by alpha / rank) it computes y + (x A) B without ever forming the full-size product A B.
    With an int8 kernel and its per-output-column `scale` [outputs...] in the `quant`
    collection, y = (x K_int8) * scale: the scale factors out of the contraction. The kernel
    itself is widened to the compute dtype for the product; XLA:CPU hoists that out of a decode
    loop (one float copy per `generate` call), libtpu keeps it int8 inside, and the CPU decode
    kernel (`llamax.model.decode_kernels`) reads it narrow (docs/performance.md, "Weight-only
    decode").
    """

    config: ModelConfig
    shape: tuple[int, ...]
    axes: tuple[str, ...]
    equation: str

    @nn.compact
    def __call__(self, x: Array) -> Array:
        out_in = self.config.kernel_layout == "out_in"
        shape, axes = (out_in_shape(self.equation, self.shape), (None, None)) if out_in else (self.shape, self.axes)
        kernel = self.param("kernel", nn.with_logical_partitioning(_init(self.config), axes), shape,
                            self.config.weight_dtype)
        dtype = self.config.compute_dtype
        x = x.astype(dtype)
        if out_in:
            y = project_out_in(self.equation, x, kernel.astype(dtype), self.shape)
        else:  # widened for the product, unless the CPU decode kernel reads it narrow
            y = project(self.equation, x, kernel, dtype)
        if self.has_variable(QUANT_COLLECTION, "scale"):
            y = y * self.get_variable(QUANT_COLLECTION, "scale").astype(dtype)  # scale: [outputs...]
        if self.has_variable(LORA_COLLECTION, "lora_a"):
            y = y + self._low_rank(x.astype(dtype), dtype)
        return y

    def _low_rank(self, x: Array, dtype: jnp.dtype) -> Array:
        a = self.get_variable(LORA_COLLECTION, "lora_a").astype(dtype)  # [inputs..., rank]
        b = self.get_variable(LORA_COLLECTION, "lora_b").astype(dtype)  # [rank, outputs...]
        operands, out_letters = self.equation.split("->")  # e.g. 'BTE,EHD', 'BTHD'
        x_letters, kernel_letters = operands.split(",")
        in_letters, rest = kernel_letters[:a.ndim - 1], kernel_letters[a.ndim - 1:]
        if set(in_letters) != set(kernel_letters) & set(x_letters):
            raise ValueError(f"{self.name}: lora_a {a.shape} does not match the inputs of "
                             f"kernel {self.shape} ({self.equation})")
        lead = "".join(letter for letter in x_letters if letter not in in_letters)  # e.g. 'BT'
        # 'R' is the rank; no projection equation uses it.
        down = project(f"{x_letters},{in_letters}R->{lead}R", x, a)  # [batch, seq, rank]
        return project(f"{lead}R,R{rest}->{out_letters}", down, b)


def kernels_out_in(params: Any) -> Any:
    """Unscanned params (float or int8) with every projection kernel [inputs..., outputs...]
    stored as one [outputs, inputs] matrix: the params of kernel_layout 'out_in'."""
    def matrix(path, leaf):
        names = [getattr(key, "key", None) for key in path]
        if names[-1] != "kernel":
            return leaf
        if names[0] == "layers" or names[-2] not in KERNEL_INPUT_AXES:  # "layers": a scanned stack
            raise ValueError(f"param {'/'.join(map(str, names))} {leaf.shape} is not an unscanned "
                             f"projection kernel (known: {', '.join(KERNEL_INPUT_AXES)})")
        inputs = math.prod(leaf.shape[:KERNEL_INPUT_AXES[names[-2]]])
        return leaf.reshape(inputs, -1).T
    return jax.tree_util.tree_map_with_path(matrix, params)


class Attention(nn.Module):
    """Grouped-query causal self-attention with segment masking and an optional KV cache."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: Array, cos: Array, sin: Array, mask: Array, segment_ids: Array,
                 layer_cache: tuple[Array, Array] | None, cache_index: Array | None):
        c = self.config
        heads, kv_heads, head_dim, embed = c.num_heads, c.num_kv_heads, c.head_dim, c.hidden_size
        q = Projection(c, (embed, heads, head_dim), ("embed", "heads", "head_dim"),
                       "BTE,EHD->BTHD", name="q_proj")(x)  # [batch, seq, heads, head_dim]
        k = Projection(c, (embed, kv_heads, head_dim), ("embed", "kv_heads", "head_dim"),
                       "BTE,EKD->BTKD", name="k_proj")(x)  # [batch, seq, kv_heads, head_dim]
        v = Projection(c, (embed, kv_heads, head_dim), ("embed", "kv_heads", "head_dim"),
                       "BTE,EKD->BTKD", name="v_proj")(x)
        q = nn.with_logical_constraint(checkpoint_name(q, "query_proj"), ACT_HEADS)
        k = nn.with_logical_constraint(checkpoint_name(k, "key_proj"), ACT_KV_HEADS)
        v = nn.with_logical_constraint(checkpoint_name(v, "value_proj"), ACT_KV_HEADS)
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)

        new_cache = None
        if layer_cache is not None:
            out, new_cache = update_and_attend(q, k, v, layer_cache, cache_index, mask, c)
        else:
            # Without a cache, query i sits at key slot i, so `mask` is causal in slot order (and
            # `segment_ids` [batch, seq] is all splash needs to rebuild it inside its kernel).
            out = attend(q, k, v, mask, c, causal=True, segment_ids=segment_ids)
        out = nn.with_logical_constraint(out, ACT_HEADS)
        out = Projection(c, (heads, head_dim, embed), ("heads", "head_dim", "embed"),
                         "BTHD,HDE->BTE", name="o_proj")(out)
        return checkpoint_name(out, "out_proj"), new_cache


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = self.config
        gate = Projection(c, (c.hidden_size, c.intermediate_size), ("embed", "mlp"), "BTE,EM->BTM",
                          name="gate_proj")(x)
        up = Projection(c, (c.hidden_size, c.intermediate_size), ("embed", "mlp"), "BTE,EM->BTM",
                        name="up_proj")(x)
        hidden = nn.with_logical_constraint(nn.silu(gate) * up, ACT_MLP)  # [batch, seq, mlp]
        return Projection(c, (c.intermediate_size, c.hidden_size), ("mlp", "embed"), "BTM,ME->BTE",
                          name="down_proj")(hidden)


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)). Returns (x, new layer cache) so
    the same module works under `nn.scan` (carry, per-layer output)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: Array, cos: Array, sin: Array, mask: Array, segment_ids: Array,
                 layer_cache: tuple[Array, Array] | None, cache_index: Array | None):
        attn_out, new_cache = Attention(self.config, name="self_attn")(
            RMSNorm(self.config, name="input_layernorm")(x), cos, sin, mask, segment_ids,
            layer_cache, cache_index)
        x = nn.with_logical_constraint(x + attn_out, ACT_EMBED)
        x = x + MLP(self.config, name="mlp")(RMSNorm(self.config, name="post_attention_layernorm")(x))
        return nn.with_logical_constraint(x, ACT_EMBED), new_cache


_PROJECTIONS = ("query_proj", "key_proj", "value_proj", "out_proj")  # checkpoint_name()s above


def _remat_policy(name: str):
    """What a rematerialized layer keeps for the backward pass (MaxText's policy names in
    brackets): `full` nothing [full]; `dots_with_no_batch_dims` the projections' and MLP's
    matmul outputs [minimal]; `save_qkv_projections` q, k, v [save_qkv_proj];
    `save_projections` q, k, v and the attention output projection; the `offload_*` policies
    move those residuals to pinned host memory instead of keeping them in HBM
    [qkv_proj_offloaded, minimal_offloaded]."""
    policies = jax.checkpoint_policies
    return {
        "full": policies.nothing_saveable,
        "dots": policies.dots_saveable,
        "dots_with_no_batch_dims": policies.dots_with_no_batch_dims_saveable,
        "save_qkv_projections": policies.save_only_these_names(*_PROJECTIONS[:3]),
        "save_projections": policies.save_only_these_names(*_PROJECTIONS),
        "offload_projections": policies.save_and_offload_only_these_names(
            names_which_can_be_saved=[], names_which_can_be_offloaded=list(_PROJECTIONS),
            offload_src="device", offload_dst="pinned_host"),
        "offload_dots_with_no_batch_dims": policies.offload_dot_with_no_batch_dims(
            offload_src="device", offload_dst="pinned_host"),
    }[name]


class Llama(nn.Module):
    """LLaMA causal LM. Call with tokens [batch, seq] -> logits [batch, seq, vocab] (float32).

    positions [batch, seq] (default 0..seq-1, or continuing from the cache) drive RoPE;
    segment_ids [batch, seq] (default all 1) keep packed documents from attending to each other;
    0 marks padding. With `cache`, returns (logits, updated cache). `logits_at` [batch] picks one
    position per row whose logits alone are computed ([batch, 1, vocab]): a prompt's prefill
    needs only its last token's, and the full [batch, seq, vocab] float32 logits are the
    largest buffer of a long prompt with a large vocabulary.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, tokens: Array, positions: Array | None = None,
                 segment_ids: Array | None = None, cache: KVCache | None = None,
                 logits_at: Array | None = None) -> Any:
        c = self.config
        batch, seq = tokens.shape
        start = jnp.zeros((), jnp.int32) if cache is None else cache.index  # [] or [batch]
        query_slots = jnp.reshape(start, (-1, 1)) + jnp.arange(seq, dtype=jnp.int32)  # [1 or batch, seq]
        if positions is None:
            positions = jnp.broadcast_to(query_slots, (batch, seq))
        if segment_ids is None:
            segment_ids = jnp.ones((batch, seq), jnp.int32)

        embed_tokens = EmbedTokens(c, name="embed_tokens")
        x = nn.with_logical_constraint(embed_tokens(tokens), ACT_EMBED)  # [batch, seq, embed]
        cos, sin = rotary_cos_sin(positions, inverse_frequencies(c.head_dim, c.rope_theta, c.rope_scaling))

        if cache is None:
            key_segments, key_slots = segment_ids, jnp.arange(seq)
            layer_caches, new_segments = None, None
        else:
            new_segments = write_at(cache.segment_ids, segment_ids, cache.index)
            window = cache.max_length if cache.attend_length is None else cache.attend_length
            key_segments, key_slots = new_segments[:batch, :window], jnp.arange(window)
            layer_caches = (cache.key, cache.value)
        mask = (key_slots[None, None, :] <= query_slots[:, :, None]) & (
            segment_ids[:, :, None] == key_segments[:, None, :])  # [batch, q_len, kv_len]

        # On CPU the stacked layers run unrolled (params stay stacked): a rolled loop writes every
        # layer's saved activations into zero-filled [layers, ...] buffers and reads them back,
        # which cost the bench train step 11% on an Intel Xeon (docs/performance.md, change 9).
        unroll = c.num_layers if c.scan_layers and builds_for_cpu() else 1
        block = DecoderLayer
        if c.remat_policy != "none":
            # A rolled scan body cannot be CSE'd with its recomputation; straight-line code can.
            block = nn.remat(DecoderLayer, policy=_remat_policy(c.remat_policy),
                             prevent_cse=not c.scan_layers or unroll > 1)
        per_layer = cache is not None and isinstance(cache.key, tuple)
        if c.scan_layers:
            if per_layer:
                raise ValueError("a per-layer KVCache needs unscanned layers (scan_layers=False)")
            stack = nn.scan(block, variable_axes={"params": 0, LORA_COLLECTION: 0, QUANT_COLLECTION: 0},
                            split_rngs={"params": True},
                            # cos, sin, mask, segment_ids shared; caches split per layer
                            in_axes=(nn.broadcast,) * 4 + (0, nn.broadcast),
                            length=c.num_layers, unroll=unroll, metadata_params={nn.PARTITION_NAME: "layers"})
            x, new_layer_caches = stack(c, name="layers")(x, cos, sin, mask, segment_ids, layer_caches,
                                                          None if cache is None else cache.index)
        else:
            outputs = []
            for i in range(c.num_layers):
                layer_cache = None if cache is None else (cache.key[i], cache.value[i])
                x, layer_out = block(c, name=f"layers_{i}")(x, cos, sin, mask, segment_ids, layer_cache,
                                                            None if cache is None else cache.index)
                outputs.append(layer_out)
            new_layer_caches = None if cache is None else tuple(
                tuple(out[j] for out in outputs) if per_layer else jnp.stack([out[j] for out in outputs])
                for j in range(2))

        if logits_at is not None:
            x = jnp.take_along_axis(x, jnp.reshape(logits_at, (batch, 1, 1)), axis=1)  # [batch, 1, embed]
        x = RMSNorm(c, name="norm")(x)
        if c.tie_word_embeddings:
            logits = embed_tokens.attend(x)
        else:
            logits = Projection(c, (c.hidden_size, c.vocab_size), ("embed", "vocab"), "BTE,EV->BTV",
                                name="lm_head")(x)
        logits = nn.with_logical_constraint(logits.astype(jnp.float32), ACT_VOCAB)
        if cache is None:
            return logits
        new_cache = KVCache(key=new_layer_caches[0], value=new_layer_caches[1],
                            segment_ids=new_segments, index=cache.index + seq,
                            attend_length=cache.attend_length)
        return logits, new_cache


class EmbedTokens(nn.Module):
    """Token embedding table [vocab, embed]; `attend` reuses it as the tied output layer."""

    config: ModelConfig

    def setup(self):
        self.embedding = self.param(
            "embedding", nn.with_logical_partitioning(_init(self.config), ("vocab", "embed")),
            (self.config.vocab_size, self.config.hidden_size), self.config.weight_dtype)

    def __call__(self, tokens: Array) -> Array:
        # Gather the FSDP shards of the table first (as every FSDP param is gathered before use):
        # a lookup into a table still split along 'embed' gives rows split along 'embed', which
        # the batch-split activations can only be reached from by replicating them whole.
        table = nn.with_logical_constraint(self.embedding, ("vocab", None))  # [vocab, embed]
        rows = jnp.take(table, tokens, axis=0).astype(self.config.compute_dtype)  # [batch, seq, embed]
        if self.has_variable(QUANT_COLLECTION, "scale"):  # int8 tied table: one scale per row
            rows = rows * jnp.take(self.get_variable(QUANT_COLLECTION, "scale"), tokens, axis=0)[..., None]
        return rows

    def attend(self, x: Array) -> Array:
        dtype = self.config.compute_dtype
        logits = jnp.einsum("BTE,VE->BTV", x.astype(dtype), self.embedding.astype(dtype))
        if self.has_variable(QUANT_COLLECTION, "scale"):
            logits = logits * self.get_variable(QUANT_COLLECTION, "scale").astype(dtype)  # scale: [vocab]
        return logits


def init_params(config: ModelConfig, rng: Array | int = 0) -> dict:
    """Random params as a plain pytree (no partitioning boxes), on the default device."""
    if isinstance(rng, int):
        rng = jax.random.key(rng)
    variables = Llama(config).init(rng, jnp.zeros((1, 1), jnp.int32))
    return nn.meta.unbox(variables["params"])


def abstract_params(config: ModelConfig) -> tuple[dict, dict]:
    """(params as ShapeDtypeStructs, their logical axis names as PartitionSpecs), from one
    abstract trace of `init` (no arrays made): what shardings are derived from."""
    boxed = jax.eval_shape(lambda: Llama(config).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
    return nn.meta.unbox(boxed["params"]), nn.get_partition_spec(boxed)["params"]


def param_logical_axes(config: ModelConfig) -> dict:
    """The logical axis names of every param, as a pytree of PartitionSpecs (no arrays made)."""
    return abstract_params(config)[1]
