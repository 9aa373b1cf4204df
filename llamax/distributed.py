"""Multi-host setup through `jax.distributed` (TPU pods, GPU clusters, CPU processes), and what
happens when one process of the run fails or disappears.

Call `initialize(...)` once per process before anything touches devices. Every process then
sees the global mesh; `jax.process_index()` picks its slice of each batch (see llamax.data).

A run of several processes stops together, each with one line and a non-zero status:

  * a process that fails (bad input on one host, an exception) calls `report_failure` (the
    CLIs do; an uncaught exception does it too): the others stop within a few seconds, naming it
    and its error, and exit with its status;
  * a process that vanishes (kill -9, a crashed or unreachable host) stops sending heartbeats:
    after `peer_timeout_s` the others stop naming it and exit with `EXIT_PEER_LOST`;
  * a process that never arrives: the others stop after `init_timeout_s`.

Rerunning every process resumes from the last committed checkpoint. The bookkeeping lives in
`llamax.peer_watch` (heartbeats and failure notices in the coordination service's key-value
store). Left alone, JAX would instead hang in a collective or barrier, then abort every process
with a C++ stack dump when its own heartbeat timeout fires; llamax sets JAX's timeouts beyond its
own so that never happens first. One case stays JAX's: when process 0 itself dies, the
coordination service it hosts dies with it and JAX ends the others at once, with its own message.
"""
from __future__ import annotations

import math
import os
import sys
import threading
from typing import Mapping

import jax

from llamax.errors import ConfigError
from llamax.peer_watch import EXIT_PEER_LOST, PeerWatch, leave_now

__all__ = ["DEFAULT_INIT_TIMEOUT_S", "DEFAULT_PEER_TIMEOUT_S", "EXIT_PEER_LOST", "initialize",
           "initialize_from_options", "report_failure", "wait_for_peers"]

ENV_PREFIX = "LLAMAX_"
DEFAULT_PEER_TIMEOUT_S = 60.0  # a process silent this long is lost
DEFAULT_INIT_TIMEOUT_S = 300.0  # JAX's default wait for every process to connect
# JAX's own heartbeat and connect timeouts abort the process with a stack dump; they are set
# this much beyond llamax's, which end the run cleanly first.
_JAX_MARGIN_S = 30

_watch: PeerWatch | None = None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, auto: bool = False,
               peer_timeout_s: float = DEFAULT_PEER_TIMEOUT_S,
               init_timeout_s: float = DEFAULT_INIT_TIMEOUT_S) -> bool:
    """Starts jax.distributed and the peer watch. Returns True if it ran.

    With an address, process count and id (CPU/GPU clusters; e.g. Slurm launchers), connects to
    that coordinator. With `auto` and no address (TPU pods, or Slurm/Open MPI environments JAX
    recognizes), JAX discovers its peers. Without either, a single process: does nothing.

    peer_timeout_s: how long a process may go without a heartbeat before the others declare it
      lost and stop (one line naming it, exit status `EXIT_PEER_LOST`).
    init_timeout_s: how long to wait for every process to connect.
    """
    peer_timeout_s = _positive_seconds(peer_timeout_s, "peer_timeout_s")
    init_timeout_s = _positive_seconds(init_timeout_s, "init_timeout_s")
    if coordinator_address:
        if num_processes is None or process_id is None:
            raise ConfigError("coordinator_address needs num_processes and process_id too "
                              f"(or the {ENV_PREFIX}NUM_PROCESSES / {ENV_PREFIX}PROCESS_ID variables)")
        target = dict(coordinator_address=coordinator_address, num_processes=int(num_processes),
                      process_id=int(process_id))
    elif auto:
        target = {}
    else:
        return False
    where = coordinator_address or "the coordinator JAX detects"
    _connect(target, peer_timeout_s, init_timeout_s, where)
    if jax.process_count() > 1:
        global _watch
        from jax._src.distributed import global_state  # the coordination-service client

        _watch = PeerWatch(global_state.client, jax.process_index(), jax.process_count(),
                           peer_timeout_s)
        _watch.start()
        _install_excepthook()
    return True


def _connect(target: dict, peer_timeout_s: float, init_timeout_s: float, where: str) -> None:
    """jax.distributed.initialize, ended with one line (not JAX's abort) if the processes have
    not all connected within `init_timeout_s`."""
    def give_up() -> None:
        leave_now(f"error: not all processes connected to {where} within {init_timeout_s:g} s "
                  f"(this is process {target.get('process_id', '?')}); start every process with the "
                  "same --coordinator_address and --num_processes, or raise --init_timeout_s",
                  EXIT_PEER_LOST)

    timer = threading.Timer(init_timeout_s, give_up)
    timer.daemon = True
    timer.start()
    try:
        jax.distributed.initialize(
            **target, initialization_timeout=math.ceil(init_timeout_s) + _JAX_MARGIN_S,
            # Twice ours plus a margin: JAX's service may notice a silent process anywhere
            # between half its timeout and all of it, and must never be first.
            heartbeat_timeout_seconds=2 * math.ceil(peer_timeout_s) + _JAX_MARGIN_S)
    finally:
        timer.cancel()


def initialize_from_options(options: Mapping[str, str]) -> bool:
    """`initialize` from command-line options, falling back to LLAMAX_* environment variables:
    coordinator_address, num_processes, process_id, distributed (auto), peer_timeout_s,
    init_timeout_s."""
    def get(name: str) -> str | None:
        return options.get(name) or os.environ.get(ENV_PREFIX + name.upper())

    auto = (get("distributed") or "").lower() in ("1", "true", "yes")
    num_processes, process_id = get("num_processes"), get("process_id")
    timeouts = {name: get(name) for name in ("peer_timeout_s", "init_timeout_s")}
    return initialize(get("coordinator_address"), _int_option(num_processes, "num_processes"),
                      _int_option(process_id, "process_id"), auto=auto,
                      **{name: value for name, value in timeouts.items() if value is not None})


def report_failure(line: str, code: int, details: str | None = None) -> int:
    """Reports that this process failed: prints `details` (default `line`) to stderr and returns
    `code`. In a multi-process run it does not return: the other processes are told (they stop,
    printing `line` with this process's number), and this process exits with `code` once they
    know. If the failure was a consequence of another process failing or vanishing first (a
    collective that broke because its peer died), that process's line is printed instead.
    """
    if _watch is None:
        print(details or line, file=sys.stderr, flush=True)
        return code
    _watch.fail(line, code, details)
    raise AssertionError("unreachable: PeerWatch.fail exits the process")


def wait_for_peers(what: str) -> None:
    """Returns once every process got here (a barrier). A process that fails or vanishes
    meanwhile ends this one with one line naming it, so nobody waits forever. Call it on every
    process, in the same order; a no-op in a single process."""
    if _watch is not None:
        _watch.wait_for_all(what)
    elif jax.process_count() > 1:  # jax.distributed started without llamax: a plain barrier
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(what)


def _install_excepthook() -> None:
    """An exception nobody caught becomes `report_failure`: its traceback printed if this process
    failed first, the other processes told; never JAX's hang-then-abort at interpreter exit."""
    import traceback

    def hook(kind, error, trace) -> None:
        text = "".join(traceback.format_exception(kind, error, trace)).rstrip()
        summary = (str(error).strip().splitlines() or [""])[0]
        report_failure(f"error: {kind.__name__}" + (f": {summary}" if summary else ""),
                       130 if kind is KeyboardInterrupt else 1, details=text)

    sys.excepthook = hook


def _positive_seconds(value: float | str, name: str) -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = float("nan")
    if not (isinstance(value, (int, float, str)) and not isinstance(value, bool)
            and math.isfinite(seconds) and seconds > 0):
        raise ConfigError(f"{name} must be a number of seconds > 0, got {value!r} (--{name}=60 or "
                          f"{ENV_PREFIX}{name.upper()}=60)")
    return seconds


def _int_option(value: str | None, name: str) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"--{name} must be an integer, got {value!r}") from None
