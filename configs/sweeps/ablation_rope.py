"""Ablation: RoPE base (rope_theta) and Llama-3.1 ("llama3") frequency scaling, trained at
seq 64; experiments.ablations.rope_long_context then evaluates each run at seq 64..512.

    python -m experiments.ablations.rope_long_context
"""
from experiments.sweep_spec import chain

GIN_FILES = ["configs/runs/tiny.gin"]

TRAIN_SEQ_LEN = 64  # configs/sweeps/llama3_x4.gin uses it as original_max_position_embeddings

BINDINGS = {
    "TRAIN_STEPS": 300,
    "BATCH_SIZE": 8,
    "SEQ_LEN": TRAIN_SEQ_LEN,
    "LEARNING_RATE": 3e-3,
    "WARMUP_STEPS": 30,
    "LOG_EVERY": 20,
    "EVAL_EVERY": 100,
    "CHECKPOINT_EVERY": 300,
    "fit.TrainConfig.progress_bar": False,
}

SWEEP = chain(
    {"config.ModelConfig.rope_theta": [10000.0, 500000.0]},
    [{"config.ModelConfig.rope_theta": 10000.0, "gin_file": "configs/sweeps/llama3_x4.gin"}],
)

NAMES = {"config.ModelConfig.rope_theta": "theta", "gin_file": "scaling"}
