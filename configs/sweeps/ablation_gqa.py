"""Ablation: grouped-query attention, 1 / 2 / 4 kv heads for 4 query heads, at an equal parameter
budget: the MLP's intermediate_size absorbs the attention params that fewer kv heads save.

Run through `python -m experiments.ablations.gqa` (writes experiments/results/gqa/), or alone:
    python -m experiments.sweep configs/sweeps/ablation_gqa.py --root runs/ablations/gqa
"""
from experiments.sweep_spec import grid, zip_

GIN_FILES = ["configs/runs/tiny.gin"]

HIDDEN, HEADS, HEAD_DIM, BASE_INTERMEDIATE = 64, 4, 16, 176  # configs/models/tiny.gin
KV_HEADS = [1, 2, 4]


def intermediate_size(kv_heads: int) -> int:
    """The MLP width that keeps per-layer params equal to full multi-head attention (kv = 4)
    with the tiny model's MLP: q/o cost 2*H*heads*d, k/v 2*H*kv*d, the MLP 3*H*I."""
    saved = 2 * HIDDEN * HEAD_DIM * (HEADS - kv_heads)
    return BASE_INTERMEDIATE + round(saved / (3 * HIDDEN))


BINDINGS = {
    "TRAIN_STEPS": 200,
    "BATCH_SIZE": 8,
    "SEQ_LEN": 128,
    "LEARNING_RATE": 3e-3,
    "WARMUP_STEPS": 20,
    "LOG_EVERY": 10,
    "EVAL_EVERY": 50,
    "CHECKPOINT_EVERY": 200,
    "fit.TrainConfig.eval_batches": 16,
    "fit.TrainConfig.progress_bar": False,
}

SWEEP = grid(
    zip_({"config.ModelConfig.num_kv_heads": KV_HEADS,
          "config.ModelConfig.intermediate_size": [intermediate_size(kv) for kv in KV_HEADS]}),
    {"SEED": [0, 1]},
)

NAMES = {"config.ModelConfig.num_kv_heads": "kv", "config.ModelConfig.intermediate_size": "mlp",
         "SEED": "seed"}
