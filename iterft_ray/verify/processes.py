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


# The zygote imports the filters' modules before it forks the first filter process (math-verify
# loads sympy, a user's module may load torch); on a busy node that can take a while, but not this long.
_START_LIMIT_S = 120.0


class FilterProcesses:
    """Worker processes that run row-filter calls, one row each at a time, under a timeout.

    A thread cannot be stopped, and a call that spins in C or holds the GIL never returns
    to a watchdog in its own process; killing the worker process is the only stop that
    always works. Each worker leads its own process group, so a filter's children die
    with it, and gets SIGKILL when its parent dies. A killed worker is replaced before
    the next row. The workers are forked from a zygote (`_Zygote`) that loaded the filters, so
    neither the first nor a replacement imports the filters' modules again.
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
        self._zygote: _Zygote | None = None

    def score_rows(self, rows: list[tuple], timeout_s: float) -> list[tuple[float, bool, str | None, str | None]]:
        """(score, accepted, filter_error, final_answer) for each (prompt, completion, meta)."""
        results: list = [None] * len(rows)
        todo = collections.deque(_Row(i, args) for i, args in enumerate(rows))
        while len(self._workers) < min(self.size, len(rows)):
            self._workers.append(self._new_worker())
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
                self._workers[self._workers.index(worker)] = self._new_worker()

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

    def start(self) -> None:
        """Start the workers now rather than at the first batch: a filter actor calls this at its start, so
        loading the filters' modules overlaps the other actors' start."""
        while len(self._workers) < self.size:
            self._workers.append(self._new_worker())

    def _new_worker(self) -> _FilterProcess:
        if self._zygote is not None and self._zygote.process.poll() is not None:  # it was killed: a new one
            self._zygote.release()
            self._zygote = None
        if self._zygote is None:
            self._zygote = _Zygote.shared()
        return self._zygote.fork(self._payload)

    def close(self) -> None:
        for worker in self._workers:
            worker.stop()
        self._workers = []
        if self._zygote is not None:
            self._zygote.release()
            self._zygote = None


class _Zygote:
    """The process the filter processes are forked from, one per process that runs filters.

    A user's filter module may import torch or a whole project: seconds of CPU for each process
    that loads it. The zygote loads each list of filters once (a list it has seen is loaded
    already; a new one whose modules it imported loads in milliseconds) and forks a filter
    process that has it; so neither the first worker, nor one that replaces a killed worker,
    nor the workers of a second list (the held-out check's) pay the imports again. It leads its
    own session and dies with its parent; its children die with it. It is shared by this
    process's `FilterProcesses` and stopped when the last one closes.

    Requests come on its control socket, one datagram each, in order: a worker's socket to fork
    a filter process for (SCM_RIGHTS; the filters follow on that socket), or a pid whose exit
    code to answer.
    """

    _current: _Zygote | None = None

    @classmethod
    def shared(cls) -> _Zygote:
        zygote = cls._current
        if zygote is None or zygote.process.poll() is not None:
            if zygote is not None:
                zygote.stop()
            zygote = cls._current = cls()
        zygote.users += 1
        return zygote

    def __init__(self):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # It imports what this process can (a test module, a Ray working_dir).
        path = os.pathsep.join(os.path.abspath(p) for p in sys.path)
        command = f"from iterft_ray.verify.processes import _zygote_main; _zygote_main({theirs.fileno()})"
        self.process = subprocess.Popen(
            [sys.executable, "-c", command],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": path},
            start_new_session=True,
        )
        theirs.close()
        self.control = ours
        self.users = 0

    def fork(self, payload: bytes) -> _FilterProcess:
        """A new filter process with the filters `payload` holds; it says hello on its socket once forked."""
        ours, theirs = socket.socketpair()
        conn = mp_connection.Connection(ours.detach())
        try:
            socket.send_fds(self.control, [b"f"], [theirs.fileno()])
            conn.send_bytes(payload)
        except OSError:  # the zygote died: the worker reports it at its hello, as one that died at start
            pass
        theirs.close()
        return _FilterProcess(conn, self)

    def exit_code(self, pid: int) -> int | None:
        """The exit code of a filter process this zygote forked (it has been killed or has exited)."""
        try:
            self.control.send(b"w" + pid.to_bytes(8, "little"))
            reply = self.control.recv(64)
        except OSError:
            return None
        return pickle.loads(reply) if reply else None

    def release(self) -> None:
        self.users -= 1
        if self.users <= 0:
            self.stop()

    def stop(self) -> None:
        if _Zygote._current is self:
            _Zygote._current = None
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
        self.control.close()
        self.process.wait()


class _FilterProcess:
    """One worker process, forked by the zygote, and the socket the parent talks to it through."""

    def __init__(self, conn: mp_connection.Connection, zygote: _Zygote):
        self.conn = conn
        self.zygote = zygote
        self.pid: int | None = None
        self.started = time.monotonic()
        self.ready = False

    def receive_ready(self) -> None:
        """Take the worker's hello: its pid, or why the filters did not load."""
        try:
            error, self.pid = pickle.loads(self.conn.recv_bytes())
        except EOFError:
            error = f"it exited with code {self.stop()} while starting"
        if error is not None:
            raise RuntimeError(f"a filter process cannot load the filters: {error}")
        self.ready = True

    def send(self, filter_index: int, args: tuple) -> None:
        self.conn.send_bytes(pickle.dumps((filter_index, args)))

    def receive(self) -> tuple[bool, Any]:
        return pickle.loads(self.conn.recv_bytes())

    def stop(self) -> int | None:
        """Kill the worker and its process group; returns its exit code (None if it never started)."""
        self.conn.close()  # one not forked yet is not: the zygote finds its socket closed
        if self.pid is None:
            return None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        return self.zygote.exit_code(self.pid)


def _zygote_main(fd: int) -> None:
    """Main of the zygote: fork a filter process per request, with its filters loaded, until the parent goes."""
    _die_with_parent()
    control = socket.socket(fileno=fd)
    loaded: dict[bytes, tuple[list | None, str | None]] = {}  # payload -> (filters, why they did not load)
    exited: dict[int, int | None] = {}  # pid -> exit code of the children reaped so far
    while True:
        try:
            request, fds, _, _ = socket.recv_fds(control, 16, 4)
        except OSError:
            return
        if not request:  # the parent closed its end
            return
        if request[:1] == b"w":
            pid = int.from_bytes(request[1:9], "little")
            if pid not in exited:
                try:
                    exited[pid] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
                except ChildProcessError:
                    exited[pid] = None
            control.send(pickle.dumps(exited.pop(pid)))
            continue
        for worker_fd in fds:
            conn = mp_connection.Connection(worker_fd)
            try:
                payload = conn.recv_bytes()
            except (EOFError, OSError):  # the parent gave up on this worker before it was forked
                conn.close()
                continue
            if payload not in loaded:
                try:
                    loaded[payload] = cloudpickle.loads(payload), None
                except Exception as e:
                    loaded[payload] = None, f"{type(e).__name__}: {e}"
            row_filters, error = loaded[payload]
            if error is not None:
                with contextlib.suppress(OSError):
                    conn.send_bytes(pickle.dumps((error, None)))
            elif os.fork() == 0:
                control.close()
                os.setsid()  # its own process group: a filter's children die with it
                _die_with_parent()
                try:
                    _serve_calls(conn, row_filters)
                finally:
                    os._exit(0)
            conn.close()
        _reap(exited)


def _reap(exited: dict[int, int | None]) -> None:
    """Collect the children that have exited (their codes kept for `exit_code`), so none lingers as a zombie."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        exited[pid] = os.waitstatus_to_exitcode(status)


def _serve_calls(conn: mp_connection.Connection, row_filters: list) -> None:
    """Main of a filter process: say hello, then answer calls until the parent goes."""
    conn.send_bytes(pickle.dumps((None, os.getpid())))
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
