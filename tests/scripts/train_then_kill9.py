"""`python -m experiments.train` whose process 1 sends itself SIGKILL (kill -9) as soon as its
first checkpoint has committed: a host lost mid-run, at the same step every time.

    python tests/scripts/train_then_kill9.py TRAIN_ARGS... --process_id=I

Pass `--gin.fit.TrainConfig.async_checkpointing=False`: the save then returns once committed, so
process 1 dies at once and process 0 is inside the next step's collective when its peer
disappears. Used by tests/test_multihost.py.
"""
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's experiments/, llamax/
from experiments import train  # noqa: E402
from llamax.train.checkpoint import Checkpointer  # noqa: E402


def die_after_first_checkpoint() -> None:
    save = Checkpointer.save

    def save_then_die(self, step, *args, **kwargs):
        started = save(self, step, *args, **kwargs)
        deadline = time.monotonic() + 20
        while step not in self.all_steps() and time.monotonic() < deadline:
            time.sleep(0.01)  # process 0 renames the step folder into place
        os.kill(os.getpid(), signal.SIGKILL)
        return started

    Checkpointer.save = save_then_die


if __name__ == "__main__":
    if "--process_id=1" in sys.argv:
        die_after_first_checkpoint()
    sys.exit(train.main(sys.argv[1:]))
