"""Training: the state and its sharded init, the step functions, the optimizer and the loop.

  step.py        TrainState, abstract state and shardings, sharded init, train/eval steps
  flops.py       model FLOPs per token, device peaks, tokens/s and MFU
  optim.py       AdamW recipe: schedule, clipping, weight-decay mask (OptimConfig)
  fit.py         the host loop: data -> steps -> logs, evals, checkpoints, exact resume
                 (DataConfig, TrainConfig, fit)
  checkpoint.py  orbax training checkpoints: async keep-N, restore onto any mesh, fallback
  metrics.py     metrics.jsonl, TensorBoard, progress bar
  preemption.py  SIGTERM -> save and stop

The loop (`llamax.train.fit`) is not imported here: importing the step functions stays cheap.
"""
from llamax.train.flops import PEAK_FLOPS_PER_DEVICE, flops_per_token, peak_flops_per_device, throughput
from llamax.train.step import (TrainState, abstract_train_state, cross_entropy_sums, init_train_state,
                               make_eval_step, make_init, make_loss_and_grads, make_train_step,
                               state_shardings, trainable_shardings)

__all__ = ["PEAK_FLOPS_PER_DEVICE", "TrainState", "abstract_train_state", "cross_entropy_sums",
           "flops_per_token", "init_train_state", "make_eval_step", "make_init",
           "make_loss_and_grads", "make_train_step", "peak_flops_per_device", "state_shardings",
           "throughput", "trainable_shardings"]
