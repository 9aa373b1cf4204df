"""Ablation: peak learning rate x warmup length on the tiny model (8 points x 120 steps).

Run through `python -m experiments.ablations.lr_warmup` (writes experiments/results/lr_warmup/),
or alone: python -m experiments.sweep configs/sweeps/ablation_lr_warmup.py --root runs/ablations/lr_warmup
"""
from experiments.sweep_spec import grid

GIN_FILES = ["configs/runs/tiny.gin"]

BINDINGS = {
    "TRAIN_STEPS": 120,
    "BATCH_SIZE": 8,
    "SEQ_LEN": 128,
    "LOG_EVERY": 10,
    "EVAL_EVERY": 40,
    "CHECKPOINT_EVERY": 120,
    "fit.TrainConfig.progress_bar": False,
}

SWEEP = grid({"LEARNING_RATE": [1e-3, 3e-3, 1e-2, 3e-2]}, {"WARMUP_STEPS": [0, 40]})

NAMES = {"LEARNING_RATE": "lr", "WARMUP_STEPS": "warmup"}
