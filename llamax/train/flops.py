"""Model FLOPs, device peaks and throughput: what MFU is computed from."""
from __future__ import annotations

import jax

from llamax.config import ModelConfig

# Dense bf16 peak FLOP/s per device. TPU keys are exact `device.device_kind` strings (one JAX
# device per chip; v5e is "TPU v5 lite", v5p is plain "TPU v5", v6e "TPU v6 lite"), so no
# generation can match another's entry. GPU keys match as a substring of the marketing name
# ("NVIDIA H100 80GB HBM3").
PEAK_FLOPS_PER_DEVICE: dict[str, float] = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
}


def peak_flops_per_device(device: jax.Device | None = None) -> float | None:
    """Dense bf16 peak of `device` (default: the first device) from the table, else None."""
    kind = (device or jax.devices()[0]).device_kind
    if kind in PEAK_FLOPS_PER_DEVICE:
        return PEAK_FLOPS_PER_DEVICE[kind]
    if kind.startswith("TPU"):  # an unlisted TPU (e.g. "TPU v4 lite") must not borrow v4's peak
        return None
    return next((flops for name, flops in PEAK_FLOPS_PER_DEVICE.items() if name in kind), None)


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Model FLOPs of training (forward + backward) per token, PaLM appendix B style:

        6 * N  +  12 * num_layers * seq_len * num_heads * head_dim

    N counts the params that do matmuls: all of them except the input embedding table, which is
    a gather (with tied embeddings the table is the output layer, so it counts), and the RMSNorm
    weights, which are elementwise. The second term
    is attention scores and values (2 matmuls x 2 FLOPs x 3 for fwd+bwd) over the full
    seq_len x seq_len matrix: the convention MFU is defined with, so figures compare across
    codebases. llamax's causal attention computes less than that (its query blocks skip the
    masked upper triangle; splash attention skips it too), so MFU slightly understates the
    useful work actually done.
    """
    norm_params = config.hidden_size * (2 * config.num_layers + 1)
    matmul_params = config.num_params() - norm_params
    if not config.tie_word_embeddings:
        matmul_params -= config.vocab_size * config.hidden_size
    attention = 12 * config.num_layers * seq_len * config.num_heads * config.head_dim
    return 6.0 * matmul_params + attention


def throughput(config: ModelConfig, batch_size: int, seq_len: int, step_time_s: float,
               num_devices: int, peak_flops: float | None = None) -> dict[str, float]:
    """tokens/s, tokens/s/device and MFU (model FLOPs / peak; only when peak_flops per device
    is known) for one step that processed batch_size x seq_len tokens in step_time_s."""
    tokens_per_s = batch_size * seq_len / step_time_s
    metrics = dict(tokens_per_s=tokens_per_s, tokens_per_s_per_device=tokens_per_s / num_devices)
    if peak_flops:
        metrics["mfu"] = tokens_per_s * flops_per_token(config, seq_len) / (peak_flops * num_devices)
    return metrics
