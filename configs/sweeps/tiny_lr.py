"""Three learning rates on the tiny Shakespeare model, 100 steps each (~1 minute per point on a CPU).

    python -m experiments.sweep configs/sweeps/tiny_lr.py --root runs/sweeps/tiny_lr [--dry_run]

See experiments/sweep_spec.py for the spec API (GIN_FILES, BINDINGS, SWEEP, NAMES).
"""
from experiments.sweep_spec import grid

GIN_FILES = ["configs/runs/tiny.gin"]

BINDINGS = {
    "TRAIN_STEPS": 100,
    "WARMUP_STEPS": 10,
    "LOG_EVERY": 10,
    "EVAL_EVERY": 50,
    "CHECKPOINT_EVERY": 50,
    "fit.TrainConfig.progress_bar": False,  # sweep.log is a file: no progress bar
}

SWEEP = grid({"LEARNING_RATE": [1e-3, 3e-3, 1e-2]})

NAMES = {"LEARNING_RATE": "lr"}
