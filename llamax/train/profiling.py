"""Traces of chosen training steps that TensorBoard's profile plugin (xprof) opens.

`StepTrace(steps, log_dir)` starts `jax.profiler` before the first step of `steps` and stops it
after the last one has finished on the device, writing `<log_dir>/plugins/profile/<time>/
<host>.xplane.pb`: the layout TensorBoard's Profile tab reads, so `tensorboard --logdir
<run>/tensorboard` shows the trace beside the run's scalars. The same trace on CPU, GPU and TPU
(XLA's own profiler); each process of a multi-host run writes its host's file.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import jax

from llamax.errors import ConfigError, check_int

logger = logging.getLogger(__name__)


def check_profile_steps(steps: tuple[int, int] | None, train_steps: int) -> None:
    """ConfigError unless `steps` is None or (first, last) with 1 <= first <= last <= train_steps."""
    if steps is None:
        return
    if not isinstance(steps, (tuple, list)) or len(steps) != 2:
        raise ConfigError(f"profile_steps must be (first, last) steps to trace, e.g. (10, 12), or None; "
                          f"got {steps!r}")
    first, last = steps
    check_int(first, "profile_steps[0]", 1)
    check_int(last, "profile_steps[1]", first)
    if last > train_steps:
        raise ConfigError(f"profile_steps={tuple(steps)} ends after the run's last step {train_steps}")


class StepTrace:
    """Profiles steps first..last (1-based, inclusive; a resumed run starts the trace at its first
    step when that falls inside). Call `before(step)` before dispatching a step, `after(step,
    outputs)` after it, and `close()` at the end (stops a trace the loop left open)."""

    def __init__(self, steps: tuple[int, int] | None, log_dir: str | os.PathLike):
        self.first, self.last = steps if steps is not None else (0, -1)
        self.log_dir = Path(log_dir)
        self.active = False

    def before(self, step: int) -> None:
        if not self.active and self.first <= step <= self.last:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.log_dir))
            self.active = True

    def after(self, step: int, outputs) -> None:
        if self.active and step >= self.last:
            jax.block_until_ready(outputs)  # the trace holds the device's work, not only dispatch
            self.close()
            logger.info("profiled steps %d-%d: tensorboard --logdir %s (Profile tab)",
                        self.first, self.last, self.log_dir)

    def close(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
