"""The processes of a multi-process run stop together: heartbeats, failure notices and a
choreographed exit, kept in the key-value store of JAX's coordination service (which process 0
hosts). `llamax.distributed` starts one `PeerWatch` per process; see its docstring for the
behaviour a user sees.

Keys, all under `llamax/`:

    heartbeat/<p>         a counter process p bumps every `interval_s`; process 0 reads them all
    host/<p>              "<hostname> pid <pid>" of process p, for messages
    failure_count         incremented once per failure: the order in which failures happened
    failures/<p>          JSON `Failure`: process p failed, or (lost=True) process 0 declared it lost
    left/<p>              process p is exiting because of a failure
    barrier/<n>-<what>/<p>  `wait_for_all`

Which failure is reported (the verdict): a lost process, if any, explains the others (the
collective that broke because its peer died fails on the survivors too, but earlier than the
heartbeats can tell: it must not be blamed); otherwise the failure that happened first.

The exit: every process prints one line, posts `left/<p>` and ends with `os._exit` (no atexit
handlers: JAX's shutdown barrier would wait for the processes that are gone, then abort).
Process 0 leaves last, since its exit takes the coordination service down, and JAX's client in
every process still running would abort at once.
"""
from __future__ import annotations

import atexit
import dataclasses
import json
import os
import re
import socket
import sys
import threading
import time
from typing import Any, Iterable, NoReturn

EXIT_PEER_LOST = 75  # sysexits' EX_TEMPFAIL: a process was lost; rerun them all to resume
_PREFIX = "llamax/"
# After the others have posted `left/`, process 0 gives them this long to be gone before its
# exit takes the coordination service down.
_EXIT_GRACE_S = 1.0


@dataclasses.dataclass(frozen=True)
class Failure:
    """Process `process` failed with the one-line error `line` and exit status `code`; `rank` is
    its place in the run's order of failures. `lost`: process 0 heard no heartbeat from it."""

    process: int
    rank: int
    line: str
    code: int
    lost: bool = False


def verdict(failures: Iterable[Failure]) -> Failure | None:
    """The failure that explains the others: the first lost process, else the first failure."""
    ordered = sorted(failures, key=lambda failure: (not failure.lost, failure.rank))
    return ordered[0] if ordered else None


def _say(text: str) -> None:
    """Flushes what the process printed so far, then prints `text` to stderr."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    print(text, file=sys.stderr, flush=True)


def leave_now(text: str, code: int) -> NoReturn:
    """Prints `text` to stderr and ends the process at once, skipping atexit handlers."""
    _say(text)
    os._exit(code)


def _wait_forever() -> NoReturn:
    """For a thread that must not go on while another one ends the process."""
    while True:
        time.sleep(3600)


class PeerWatch:
    """One per process of a multi-process run: a daemon thread heartbeats, watches for failures
    of other processes (process 0 also for silent ones) and ends this process with one line when
    there is one.

    Args:
      client: JAX's coordination-service client (`jax._src.distributed.global_state.client`).
      process_index, process_count: this process and how many there are.
      timeout_s: a process whose heartbeat does not change for this long is lost.
    """

    def __init__(self, client: Any, process_index: int, process_count: int, timeout_s: float):
        self.client = client
        self.me, self.count = process_index, process_count
        self.timeout_s = timeout_s
        self.interval_s = min(1.0, timeout_s / 10)
        self._lock = threading.Lock()
        self._leaving = False
        self._failed: Failure | None = None  # set once this process reported its own failure
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="llamax-peer-watch", daemon=True)
        self._heard: dict[int, tuple[str | None, float]] = {}  # process 0: last beat, when it changed
        self._hosts: dict[int, str] = {}
        self._barriers = 0

    def others(self) -> list[int]:
        return [process for process in range(self.count) if process != self.me]

    def start(self) -> None:
        self._set(f"host/{self.me}", f"{socket.gethostname()} pid {os.getpid()}")
        started = time.monotonic()
        self._heard = {process: (None, started) for process in self.others()}
        self._thread.start()
        # Registered after JAX's own atexit handler, so it runs first: every process finishes
        # before any enters JAX's shutdown barrier (which aborts if a peer dies meanwhile).
        atexit.register(self._finish)

    # ---- the key-value store ----

    def _set(self, key: str, value: str, overwrite: bool = True) -> None:
        self.client.key_value_set(_PREFIX + key, value, allow_overwrite=overwrite)

    def _dir(self, key: str) -> dict[int, str]:
        """{process: value} of the keys `<key>/<process>`."""
        return {int(name.rsplit("/", 1)[1]): value
                for name, value in self.client.key_value_dir_get(f"{_PREFIX}{key}/")}

    def _failures(self) -> list[Failure]:
        return [Failure(**json.loads(value)) for value in self._dir("failures").values()]

    def _post(self, failure: Failure) -> None:
        rank = self.client.key_value_increment(_PREFIX + "failure_count", 1)
        record = json.dumps(dataclasses.asdict(dataclasses.replace(failure, rank=rank)))
        try:
            self._set(f"failures/{failure.process}", record, overwrite=False)
        except Exception:  # noqa: BLE001 - already there (declared lost meanwhile): the first stays
            pass

    def _host(self, process: int) -> str:
        if process not in self._hosts:
            try:
                self._hosts.update(self._dir("host"))
            except Exception:  # noqa: BLE001 - only for the message
                pass
        return self._hosts.get(process, "host unknown")

    # ---- watching ----

    def _run(self) -> None:
        beat = 0
        while not self._stop.wait(self.interval_s):
            beat += 1
            try:
                self._set(f"heartbeat/{self.me}", str(beat))
                failures = self._failures()
                if self.me == 0:
                    failures += self._declare_lost(failures)
            except Exception:  # noqa: BLE001 - service unreachable: JAX's client ends the process
                continue
            first = verdict(failures)
            if first is not None and self._failed is None:  # a failing process decides itself
                self._leave(self._line_for(first), self._code_for(first))
                return

    def _declare_lost(self, failures: list[Failure]) -> list[Failure]:
        """Process 0: posts (and returns) a lost Failure for each process whose heartbeat has not
        changed for `timeout_s`, unless it already failed or left."""
        now = time.monotonic()
        beats = self._dir("heartbeat")
        accounted = set(self._dir("left")) | {failure.process for failure in failures}
        lost = []
        for process in self.others():
            last, since = self._heard[process]
            if beats.get(process) != last:
                self._heard[process] = (beats.get(process), now)
            elif process not in accounted and now - since > self.timeout_s:
                lost.append(Failure(
                    process, 0, f"error: lost process {process} of {self.count} ({self._host(process)}): "
                    f"no heartbeat for {self.timeout_s:g} s (killed, crashed or unreachable), so every "
                    "process stops; rerun them all to resume from the last checkpoint", EXIT_PEER_LOST,
                    lost=True))
                self._post(lost[-1])
        return lost

    def _line_for(self, failure: Failure) -> str:
        if failure.process == self.me or failure.lost:
            return failure.line
        error = re.sub(r"^error:\s*", "", failure.line)
        return (f"error: process {failure.process} of {self.count} ({self._host(failure.process)}) "
                f"failed, so this one stops too: {error}")

    @staticmethod
    def _code_for(failure: Failure) -> int:
        return EXIT_PEER_LOST if failure.lost else failure.code

    # ---- failing and leaving ----

    def fail(self, line: str, code: int, details: str | None = None) -> NoReturn:
        """This process failed: tells the others, waits (at most `timeout_s`) until each one has
        answered (left, failed too, or been declared lost), then exits printing the verdict:
        `details or line` when it is this failure, else the other process's line."""
        with self._lock:
            leaving = self._leaving
            if not leaving:
                self._failed = Failure(self.me, 0, line, code)
        if leaving:
            _wait_forever()
        try:
            self._post(self._failed)
        except Exception:  # noqa: BLE001 - the service is gone with process 0; JAX ends us
            pass
        deadline = time.monotonic() + self.timeout_s + 2 * self.interval_s
        while time.monotonic() < deadline:
            try:
                failures, left = self._failures(), set(self._dir("left"))
            except Exception:  # noqa: BLE001
                time.sleep(self.interval_s)
                continue
            first = verdict(failures)
            # Another process failed first; with this very error (the same bad config on every
            # host), each process reports its own.
            if first is not None and first.process != self.me and (first.lost or first.line != line):
                self._leave(self._line_for(first), self._code_for(first))
                _wait_forever()
            answered = left | {failure.process for failure in failures}
            if all(process in answered for process in self.others()):
                break
            time.sleep(self.interval_s / 2)
        self._leave(details or line, code)
        _wait_forever()

    def _leave(self, text: str, code: int) -> None:
        """Prints `text`, posts `left/<me>` and exits with `code`; returns only when another
        thread is already leaving."""
        with self._lock:
            if self._leaving:
                return
            self._leaving = True
        _say(text)
        try:
            self._set(f"left/{self.me}", "1")
            if self.me == 0:
                self._outlast_others()
        except Exception:  # noqa: BLE001 - leaving regardless
            pass
        os._exit(code)

    def _outlast_others(self) -> None:
        """Process 0: waits (at most `timeout_s`) until every other process has left or is lost."""
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            gone = set(self._dir("left")) | {f.process for f in self._failures() if f.lost}
            if all(process in gone for process in self.others()):
                time.sleep(_EXIT_GRACE_S)
                return
            time.sleep(self.interval_s / 4)

    # ---- barriers ----

    def wait_for_all(self, what: str) -> None:
        """Returns once every process has called `wait_for_all` as often as this one; a failure
        elsewhere ends this process meanwhile (the watch thread)."""
        self._barriers += 1
        key = f"barrier/{self._barriers}-{re.sub(r'[^A-Za-z0-9_.-]', '_', what)}"
        self._set(f"{key}/{self.me}", "1")
        pause = 0.01
        while len(self._dir(key)) < self.count:
            time.sleep(pause)
            pause = min(2 * pause, self.interval_s)

    def _finish(self) -> None:
        """atexit: every process finished; stop watching before JAX shuts the client down."""
        if self._leaving or self._failed is not None:
            return
        try:
            self.wait_for_all("exit")
        finally:
            self._stop.set()
            self._thread.join(timeout=self.timeout_s)
