"""The filter processes: worker processes that run row filters on a batch's rows, each call under a real timeout.

`iterft_ray.verify.scoring` hands them one (prompt, completion, meta) per row and gets back
one (score, accepted, filter_error, final_answer); nothing here knows about tables or selectors.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import multiprocessing.connection as mp_connection
import numbers
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import cloudpickle

from iterft_ray.verify.verdict import Verdict

if TYPE_CHECKING:
    from iterft_ray.verify.filters import RowFilter


@dataclass
class _Row:
    """A row on its way through the row filters, in one filter process."""

    index: int
    args: tuple
    filter_index: int = 0
    total: float | None = None
    answer: str | None = None  # the first final answer a filter's Verdict gave
    deadline: float = 0.0


# A filter process imports the filters' modules before its first call (math-verify
# loads sympy); on a busy node that can take a while, but not this long.
_START_LIMIT_S = 120.0


class FilterProcesses:
    """Worker processes that run row-filter calls, one row each at a time, under a timeout.

    A thread cannot be stopped, and a call that spins in C or holds the GIL never returns
    to a watchdog in its own process; killing the worker process is the only stop that
    always works. Each worker leads its own process group, so a filter's children die
    with it, and gets SIGKILL when its parent dies. A killed worker is replaced before
    the next row.
    """

    def __init__(self, row_filters: list[RowFilter], size: int, passed_score: float = 1.0):
        """`passed_score`: the score of a row that passed and that no filter gave a number (1.0 for gates only;
        0.0 when a reward model's reward is added afterwards, so the score is the reward)."""
        self.row_filters = row_filters
        self.passed_score = passed_score
        self.names = [getattr(f, "__name__", None) or getattr(f, "name", None) or repr(f) for f in row_filters]
        self.size = size
        try:
            self._payload = cloudpickle.dumps(row_filters)
        except Exception as e:
            raise ValueError(f"row filters {self.names}: cannot be pickled for a filter process: {e}") from None
        self._workers: list[_FilterProcess] = []

    def score_rows(self, rows: list[tuple], timeout_s: float) -> list[tuple[float, bool, str | None, str | None]]:
        """(score, accepted, filter_error, final_answer) for each (prompt, completion, meta)."""
        results: list = [None] * len(rows)
        todo = collections.deque(_Row(i, args) for i, args in enumerate(rows))
        while len(self._workers) < min(self.size, len(rows)):
            self._workers.append(_FilterProcess(self._payload))
        busy: dict[_FilterProcess, _Row] = {}

        def call(worker: _FilterProcess, row: _Row) -> None:
            busy[worker] = row
            row.deadline = time.monotonic() + timeout_s
            try:
                worker.send(row.filter_index, row.args)
            except OSError:  # it died between calls; the next receive reports it
                pass

        def finish(worker: _FilterProcess, row: _Row, result: tuple, replace: bool = False) -> None:
            results[row.index] = result
            del busy[worker]
            if replace:
                self._workers[self._workers.index(worker)] = _FilterProcess(self._payload)

        while todo or busy:
            for worker in self._workers:
                if todo and worker.ready and worker not in busy:
                    call(worker, todo.popleft())
            waiting = [w for w in self._workers if w in busy or not w.ready]
            deadlines = [row.deadline for row in busy.values()]
            deadlines += [w.started + _START_LIMIT_S for w in waiting if not w.ready]
            wait_s = max(0.0, min(deadlines) - time.monotonic())
            for conn in mp_connection.wait([w.conn for w in waiting], wait_s):
                worker = next(w for w in waiting if w.conn is conn)
                if not worker.ready:
                    worker.receive_ready()
                    continue
                row = busy[worker]
                try:
                    ok, value = worker.receive()
                except (EOFError, OSError):
                    error = f"filter process died with exit code {worker.stop()}"
                    finish(worker, row, self._reject(row, f"{self.names[row.filter_index]}: {error}"), replace=True)
                    continue
                done = self._advance(row, ok, value)
                if done is None:
                    call(worker, row)
                else:
                    finish(worker, row, done)
            now = time.monotonic()
            for worker in self._workers:
                if not worker.ready and now > worker.started + _START_LIMIT_S:
                    raise RuntimeError(f"a filter process did not start within {_START_LIMIT_S}s")
            for worker, row in list(busy.items()):
                if now >= row.deadline:
                    worker.stop()
                    error = f"{self.names[row.filter_index]}: TimeoutError: timeout after {timeout_s:g}s"
                    finish(worker, row, self._reject(row, error), replace=True)
        return results

    def _advance(self, row: _Row, ok: bool, value: Any) -> tuple[float, bool, str | None, str | None] | None:
        """Apply one filter's result; the row's final result, or None when the next filter runs."""
        name = self.names[row.filter_index]
        if not ok:
            return self._reject(row, f"{name}: {value}")
        if isinstance(value, Verdict):
            if row.answer is None and value.answer is not None:
                row.answer = str(value.answer)
            value = value.value
        if isinstance(value, bool):
            if not value:
                return self._reject(row, None)
        elif isinstance(value, numbers.Real):
            row.total = (row.total or 0.0) + float(value)
        else:
            return self._reject(row, f"{name}: returned {value!r}, expected a bool or a number")
        row.filter_index += 1
        if row.filter_index < len(self.row_filters):
            return None
        return (self.passed_score if row.total is None else row.total), True, None, row.answer

    @staticmethod
    def _reject(row: _Row, error: str | None) -> tuple[float, bool, str | None, str | None]:
        """A rejected row keeps the score so far, and the answer it gave (a wrong answer counts in a vote)."""
        return row.total or 0.0, False, error, row.answer

    def close(self) -> None:
        for worker in self._workers:
            worker.stop()
        self._workers = []


class _FilterProcess:
    """One worker process and the socket the parent talks to it through."""

    def __init__(self, payload: bytes):
        ours, theirs = socket.socketpair()
        # The worker imports what this process can (a test module, a Ray working_dir).
        path = os.pathsep.join(os.path.abspath(p) for p in sys.path)
        command = f"from iterft_ray.verify.processes import _serve_calls; _serve_calls({theirs.fileno()})"
        self.process = subprocess.Popen(
            [sys.executable, "-c", command],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": path},
            start_new_session=True,
        )
        theirs.close()
        self.conn = mp_connection.Connection(ours.detach())
        self.conn.send_bytes(payload)
        self.started = time.monotonic()
        self.ready = False

    def receive_ready(self) -> None:
        """Take the worker's hello; it says whether the filters loaded there."""
        try:
            error = pickle.loads(self.conn.recv_bytes())
        except EOFError:
            error = f"it exited with code {self.stop()} while starting"
        if error is not None:
            raise RuntimeError(f"a filter process cannot load the filters: {error}")
        self.ready = True

    def send(self, filter_index: int, args: tuple) -> None:
        self.conn.send_bytes(pickle.dumps((filter_index, args)))

    def receive(self) -> tuple[bool, Any]:
        return pickle.loads(self.conn.recv_bytes())

    def stop(self) -> int:
        """Kill the worker and its process group; returns its exit code."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
        self.conn.close()
        return self.process.wait()


def _serve_calls(fd: int) -> None:
    """Main of a filter process: load the filters, then answer calls until the parent goes."""
    _die_with_parent()
    conn = mp_connection.Connection(fd)
    try:
        row_filters = cloudpickle.loads(conn.recv_bytes())
    except Exception as e:
        conn.send_bytes(pickle.dumps(f"{type(e).__name__}: {e}"))
        return
    conn.send_bytes(pickle.dumps(None))
    while True:
        try:
            filter_index, args = pickle.loads(conn.recv_bytes())
        except EOFError:
            return
        try:
            reply = (True, row_filters[filter_index](*args))
            data = pickle.dumps(reply)
        except Exception as e:
            data = pickle.dumps((False, f"{type(e).__name__}: {e}"))
        conn.send_bytes(data)


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies, so no filter outlives its actor."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent died before prctl
            os._exit(1)
