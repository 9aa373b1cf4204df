"""Training: the state and its sharded init, the step functions, the optimizer and the loop.

  setup.py            TrainSetup: what a run derives from its configs (abstract state, shardings,
                      jitted init and steps), built once by make_train_setup
  step.py             TrainState and the step functions: loss, gradients, update, eval sums
  objectives.py       what a step differentiates: CrossEntropy (pretrain, SFT) or DPO (preferences)
  dpo_reference.py    DPO reference log-probs computed once and stored with the data
  optim.py            AdamW recipe: schedule, clipping, weight-decay mask (OptimConfig)
  flops.py            model FLOPs per token, device peaks, tokens/s and MFU
  fit.py              the host loop: checks -> run dir -> setup -> restore/init -> steps, logs,
                      evals, checkpoints, exact resume (TrainConfig, fit)
  checkpoint.py       orbax training checkpoints: async keep-N, restore onto any mesh, fallback
  checkpoint_tree.py  saved vs requested trees: restore targets, compatibility, restore args
  metrics.py          the metrics file, TensorBoard, progress bar
  tensorboard.py      TensorBoard event files, written without TensorFlow
  profiling.py        jax.profiler traces of chosen steps (TrainConfig.profile_steps)
  preemption.py       SIGTERM -> save and stop

One training step, in order: `fit._loop` -> `setup.TrainSetup.train_step` (jit) ->
`step.train_step` (loss and grads of `model.llama.Llama`, then `optim`'s AdamW update).
The loop (`llamax.train.fit`) is not imported here: importing the step functions stays cheap.
"""
from llamax.train.flops import PEAK_FLOPS_PER_DEVICE, flops_per_token, peak_flops_per_device, throughput
from llamax.train.setup import (TrainSetup, abstract_train_state, init_train_state, make_eval_step,
                                make_init, make_loss_and_grads, make_train_setup, make_train_step,
                                state_shardings, trainable_shardings)
from llamax.train.step import TrainState, cross_entropy_sums

__all__ = ["PEAK_FLOPS_PER_DEVICE", "TrainSetup", "TrainState", "make_train_setup", "abstract_train_state", "cross_entropy_sums",
           "flops_per_token", "init_train_state", "make_eval_step", "make_init",
           "make_loss_and_grads", "make_train_step", "peak_flops_per_device", "state_shardings",
           "throughput", "trainable_shardings"]
