"""Chaos resume: a real `python -m experiments.train` run SIGKILLed at 5 seeded random moments
(two of them while an async checkpoint is being written), resumed after each, ends bit for bit
where an uninterrupted run ends; after every kill only finalized steps are listed and the newest
restores. The machinery (and a longer run recorded in benchmarks/RESULTS.md) is benchmarks/chaos.py.
"""
import pytest

from benchmarks.chaos import markdown, run_chaos

# Reading a step another process is writing makes tensorstore abandon coroutines that orbax's loop
# later reports as "Exception ignored ... Event loop is closed"; the reads themselves are asserted.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_is_bitwise_exact(tmp_path):
    result = run_chaos(tmp_path, steps=30, checkpoint_every=2, seed=0,
                       phases=["save", "step", "startup", "save", "step"])
    table = markdown(result)
    trials = result["trials"]
    assert len(trials) == 5, table
    # The save kills really landed mid-save: the killed process left its tmp directory behind.
    assert all(t.in_flight for t in trials if t.phase == "save"), table
    # Each restart resumed from the newest checkpoint the previous kill left (never a later one).
    for before, after in zip(trials, trials[1:]):
        assert after.resumed_from == before.last_committed, table
    assert result["steps_logged"] == list(range(1, 31)), table
    assert result["losses_equal"], table
    assert result["params_bitwise_equal"], table
