"""Processes that run calls, each killable past a deadline: forked from a zygote that loaded the callables once.

A thread cannot be stopped, and a call that spins in C or holds the GIL never returns to a
watchdog in its own process; killing the process that runs it is the only stop that always
works. The row filters (`iterft_ray.verify.processes`) and the environments
(`iterft_ray.envs.hosts`) both run their user code here: a payload is a cloudpickled list of
callables, and a call is (index, args) -> (ok, value or "Type: message").
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing.connection as mp_connection
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import cloudpickle

# The zygote imports the callables' modules before it forks the first process (math-verify loads sympy, a
# user's module may load torch); on a busy node that can take a while, but not this long.
START_LIMIT_S = 120.0


class Zygote:
    """The process the call processes are forked from, one per process that runs them.

    A user's filter or environment module may import torch or a whole project: seconds of CPU for
    each process that loads it. The zygote loads each payload once (one it has seen is loaded
    already; a new one whose modules it imported loads in milliseconds) and forks a process that
    has it; so neither the first worker, nor one that replaces a killed worker, nor the workers of
    a second list (the held-out check's filters) pay the imports again. It leads its own session
    and dies with its parent; its children die with it. It is shared by this process's users and
    stopped when the last one releases it. Its requests are serialised by a lock, so threads (an
    environment actor's) may share it.

    Requests come on its control socket, one datagram each, in order: a worker's socket to fork
    a process for (SCM_RIGHTS; the payload follows on that socket), or a pid whose exit code to answer.
    """

    _current: Zygote | None = None
    _lock = threading.RLock()

    @classmethod
    def shared(cls) -> Zygote:
        with cls._lock:
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
        command = f"from iterft_ray.call_processes import _zygote_main; _zygote_main({theirs.fileno()})"
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

    def fork(self, payload: bytes) -> CallProcess:
        """A new process with the callables `payload` holds; it says hello on its socket once forked."""
        ours, theirs = socket.socketpair()
        conn = mp_connection.Connection(ours.detach())
        with Zygote._lock:
            try:
                socket.send_fds(self.control, [b"f"], [theirs.fileno()])
                conn.send_bytes(payload)
            except OSError:  # the zygote died: the worker reports it at its hello, as one that died at start
                pass
        theirs.close()
        return CallProcess(conn, self)

    def exit_code(self, pid: int) -> int | None:
        """The exit code of a process this zygote forked (it has been killed or has exited)."""
        with Zygote._lock:
            try:
                self.control.send(b"w" + pid.to_bytes(8, "little"))
                reply = self.control.recv(64)
            except OSError:
                return None
        return pickle.loads(reply) if reply else None

    def release(self) -> None:
        with Zygote._lock:
            self.users -= 1
            if self.users <= 0:
                self.stop()

    def stop(self) -> None:
        with Zygote._lock:
            if Zygote._current is self:
                Zygote._current = None
            if self.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
            self.control.close()
            self.process.wait()


def live_zygote(zygote: Zygote | None) -> Zygote:
    """`zygote` while its process runs; else (none yet, or it was killed) the shared one, the dead one released."""
    if zygote is not None and zygote.process.poll() is not None:
        zygote.release()
        zygote = None
    return zygote if zygote is not None else Zygote.shared()


class CallTimeout(Exception):
    """A call ran past its deadline; its process was killed."""


class CallProcessDied(RuntimeError):
    """The process running a call died (a segfault, an OOM kill, os._exit)."""


class CallProcess:
    """One worker process, forked by the zygote, and the socket the parent talks to it through.

    `send` / `receive` are for a parent that waits on many at once (`multiprocessing.connection.wait`);
    `call` is one blocking call under a deadline, for a thread that serves one process.
    """

    def __init__(self, conn: mp_connection.Connection, zygote: Zygote):
        self.conn = conn
        self.zygote = zygote
        self.pid: int | None = None
        self.started = time.monotonic()
        self.ready = False

    def receive_ready(self) -> None:
        """Take the worker's hello: its pid, or why the payload did not load."""
        try:
            error, self.pid = pickle.loads(self.conn.recv_bytes())
        except EOFError:
            error = f"it exited with code {self.stop()} while starting"
        if error is not None:
            raise RuntimeError(f"a process cannot load its callables: {error}")
        self.ready = True

    def send(self, index: int, args: tuple) -> None:
        self.conn.send_bytes(pickle.dumps((index, args)))

    def receive(self) -> tuple[bool, Any]:
        return pickle.loads(self.conn.recv_bytes())

    def call(self, index: int, args: tuple, timeout_s: float) -> tuple[bool, Any]:
        """Call the payload's `index`-th callable with `args` and wait at most `timeout_s` for it: (True, value), or
        (False, "Type: message") for what it raised. A process not started yet gets `START_LIMIT_S` first (a busy
        node forks slowly; that is not the call's time). Raises `CallTimeout` (the process killed) past either
        and `CallProcessDied` when it dies; either way the process is done with."""
        if not self.ready:
            if not self.conn.poll(max(0.0, START_LIMIT_S - (time.monotonic() - self.started))):
                self.stop()
                raise CallTimeout(f"the process did not start within {START_LIMIT_S:g}s")
            try:
                self.receive_ready()
            except RuntimeError as e:
                self.stop()
                raise CallProcessDied(str(e)) from None
        deadline = time.monotonic() + timeout_s
        try:
            self.send(index, args)
            answered = self.conn.poll(max(0.0, deadline - time.monotonic()))
            if answered:
                return self.receive()
        except (EOFError, OSError):
            raise CallProcessDied(f"the process died with exit code {self.stop()}") from None
        self.stop()
        raise CallTimeout(f"timeout after {timeout_s:g}s")

    def stop(self) -> int | None:
        """Kill the worker and its process group; returns its exit code (None if it never started)."""
        self.conn.close()  # one not forked yet is not: the zygote finds its socket closed
        if self.pid is None:
            return None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        return self.zygote.exit_code(self.pid)


def _zygote_main(fd: int) -> None:
    """Main of the zygote: fork a call process per request, with its payload loaded, until the parent goes."""
    _die_with_parent()
    control = socket.socket(fileno=fd)
    loaded: dict[bytes, tuple[list | None, str | None]] = {}  # payload -> (callables, why they did not load)
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
            callables, error = loaded[payload]
            if error is not None:
                with contextlib.suppress(OSError):
                    conn.send_bytes(pickle.dumps((error, None)))
            elif os.fork() == 0:
                control.close()
                os.setsid()  # its own process group: a call's children die with it
                _die_with_parent()
                try:
                    _serve_calls(conn, callables)
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


def _serve_calls(conn: mp_connection.Connection, callables: list) -> None:
    """Main of a call process: say hello, then answer calls until the parent goes."""
    conn.send_bytes(pickle.dumps((None, os.getpid())))
    while True:
        try:
            index, args = pickle.loads(conn.recv_bytes())
        except EOFError:
            return
        try:
            reply = (True, callables[index](*args))
            data = pickle.dumps(reply)
        except Exception as e:
            data = pickle.dumps((False, f"{type(e).__name__}: {e}"))
        conn.send_bytes(data)


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies, so no call process outlives its actor."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent died before prctl
            os._exit(1)
