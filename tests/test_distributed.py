"""llamax.distributed's options and llamax.peer_watch's verdict, in one process. The behaviour
with real processes (a peer killed, failing its checks, never starting) is tests/test_multihost.py."""
import pytest

from llamax import distributed
from llamax.errors import ConfigError
from llamax.peer_watch import EXIT_PEER_LOST, Failure, verdict


def test_verdict_blames_a_lost_process_over_errors_that_came_first():
    # Process 0's collective broke when process 2 died: that error is ranked first, but the
    # heartbeats tell later that process 2 is the cause.
    broken_collective = Failure(0, 1, "error: JaxRuntimeError: Gloo all-reduce failed", 1)
    also_broken = Failure(1, 2, "error: JaxRuntimeError: Gloo all-reduce failed", 1)
    lost = Failure(2, 3, "error: lost process 2 of 3", EXIT_PEER_LOST, lost=True)
    assert verdict([broken_collective, lost, also_broken]) == lost
    assert verdict([also_broken, broken_collective]) == broken_collective  # else the first
    assert verdict([]) is None


@pytest.mark.parametrize("name", ["peer_timeout_s", "init_timeout_s"])
@pytest.mark.parametrize("value", ["abc", "0", "-5", "nan", "inf"])
def test_bad_timeouts_are_one_config_error_before_connecting(name, value):
    options = {"coordinator_address": "127.0.0.1:1", "num_processes": "2", "process_id": "0",
               name: value}
    with pytest.raises(ConfigError, match=f"{name} must be a number of seconds > 0, got '{value}'"):
        distributed.initialize_from_options(options)


def test_timeouts_are_read_from_the_environment(monkeypatch):
    monkeypatch.setenv("LLAMAX_PEER_TIMEOUT_S", "soon")
    with pytest.raises(ConfigError, match="peer_timeout_s .* got 'soon'"):
        distributed.initialize_from_options({})


def test_bad_process_counts_are_config_errors():
    with pytest.raises(ConfigError, match="--num_processes must be an integer, got 'two'"):
        distributed.initialize_from_options({"coordinator_address": "127.0.0.1:1",
                                             "num_processes": "two", "process_id": "0"})
    with pytest.raises(ConfigError, match="needs num_processes and process_id"):
        distributed.initialize(coordinator_address="127.0.0.1:1")


def test_single_process_failure_is_printed_and_returned(capsys):
    assert distributed.report_failure("error: DataError: no such file", 1) == 1
    assert capsys.readouterr().err == "error: DataError: no such file\n"
    distributed.wait_for_peers("nothing to wait for")  # one process: returns at once
