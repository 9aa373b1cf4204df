"""Turn SIGTERM (preemption notice) into a flag the training loop checks after each step.

Schedulers (Slurm, Kubernetes, TPU/GCE maintenance) send SIGTERM some seconds before killing a job.
Dying mid-step loses everything since the last periodic checkpoint; instead the handler only sets
a flag, the loop finishes its current step, saves that step, waits for the write, and exits 0:

    with PreemptionGuard() as guard:
        for step in range(start, num_steps):
            state = train_step(state, batch)
            checkpointer.save(step + 1, state, extras)           # periodic (interval-gated)
            if guard.should_stop(step + 1):
                checkpointer.save(step + 1, state, extras, force=True)
                checkpointer.wait()
                break                                             # normal exit, status 0

Multi-host: every process must save the *same* step, but a signal may reach hosts at different
steps. With more than one process the guard therefore installs no Python handler (that would
replace the SIGTERM notifier of JAX's preemption service) and `should_stop` defers to
`orbax.checkpoint.utils.reached_preemption(step)`, JAX's cross-host preemption sync point
(needs `jax.distributed.initialize()`; the service is on by default).
"""
from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any, Sequence

import jax
import orbax.checkpoint as ocp

logger = logging.getLogger(__name__)


class PreemptionGuard:
    """Context manager: while active, the given signals set a stop flag instead of killing.

    Args:
      signals: signals to intercept; SIGTERM by default (add signal.SIGINT to also make Ctrl-C
        checkpoint before exiting).
    """

    def __init__(self, signals: Sequence[int] = (signal.SIGTERM,)) -> None:
        self._signals = tuple(signals)
        self._received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> PreemptionGuard:
        if jax.process_count() > 1:
            logger.info("PreemptionGuard: %d processes, using JAX's preemption sync point.",
                        jax.process_count())
            return self
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError(
                "PreemptionGuard must be entered in the main thread (Python only delivers signals "
                "there); enter it around the training loop in the main script."
            )
        for signum in self._signals:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # Only set a flag: a signal handler runs between bytecodes, anywhere in the step.
        if self._received is None:
            name = signal.Signals(signum).name
            logger.warning("Received %s: will checkpoint and stop after the current step.", name)
        self._received = signum

    @property
    def received_signal(self) -> int | None:
        """The signal number that requested a stop, or None."""
        return self._received

    def request_stop(self) -> None:
        """Requests a stop as if a signal arrived (tests, programmatic shutdown; single process)."""
        self._received = signal.SIGTERM

    def should_stop(self, step: int) -> bool:
        """True if the loop should save `step` now and exit. Call after every step, on every process."""
        if jax.process_count() > 1:
            return bool(ocp.utils.reached_preemption(step))
        return self._received is not None
