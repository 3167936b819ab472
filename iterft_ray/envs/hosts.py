"""Environments in processes of their own: one instance per process, each call under `env.turn_timeout_s`.

`EnvHost` runs in a call process (`iterft_ray.call_processes`) and holds the environment of one
trajectory at a time; `EnvProcesses`, in the environment actor, keeps a process per trajectory in
flight (idle ones are reused by the next trajectory) and answers every call with a `Reply`, never an
exception: an environment that raises, hangs past the deadline (its process is killed) or dies ends
only its own trajectory. No Ray here.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any, NamedTuple

import cloudpickle

from iterft_ray.call_processes import CallProcess, CallProcessDied, CallTimeout, Zygote, live_zygote
from iterft_ray.envs.protocol import EnvFactory, Messages, checked_init, checked_step, resolve_env


class Reply(NamedTuple):
    """An environment call's outcome: `ok`, its value (or the error's text), and the seconds it took. `lost`: the
    trajectory's environment is gone with no fault of its own (its actor restarted), so it may run again."""

    ok: bool
    value: Any
    seconds: float
    lost: bool = False


class EnvHost:
    """The callable a process runs: ("open", name, extras, prompt) -> prompt messages; ("step", action) ->
    a checked step; ("close",) -> the trajectory's metrics (JSON-safe)."""

    def __init__(self, name: str, env_config: dict[str, Any]):
        self.name, self.env_config = name, env_config
        self.env = None
        self._factories: dict[str, EnvFactory] = {}

    def __reduce__(self):
        # Unpickled in the zygote: the environment's modules load there once, not in each process's first call.
        return _loaded_host, (self.name, self.env_config)

    def __call__(self, op: str, *args: Any) -> Any:
        if op == "open":
            name, extras, prompt = args
            if name not in self._factories:
                self._factories[name] = resolve_env(name)
            self.env = self._factories[name](dict(self.env_config), extras)
            return checked_init(self.env.init(prompt), prompt)
        if op == "step":
            return checked_step(self.env.step(args[0]))
        if op == "close":
            env, self.env = self.env, None
            if env is None:
                return {}
            get_metrics = getattr(env, "get_metrics", None)
            metrics = get_metrics() if callable(get_metrics) else {}
            env.close()
            return json.loads(json.dumps(metrics or {}, default=str))
        raise ValueError(f"unknown environment call {op!r}")


def _loaded_host(name: str, env_config: dict[str, Any]) -> EnvHost:
    host = EnvHost(name, env_config)
    try:
        host._factories[name] = resolve_env(name)
    except ValueError:
        pass  # a row's own env_class may be all this host serves; the first open says what is wrong
    return host


class EnvProcesses:
    """The processes of one environment actor, by trajectory key. Thread-safe: calls for different
    trajectories run at once (one actor thread each), the calls of one trajectory in order."""

    def __init__(self, name: str, env_config: dict[str, Any], timeout_s: float):
        self.timeout_s = timeout_s
        self._payload = cloudpickle.dumps([EnvHost(name, env_config)])
        self._zygote: Zygote | None = None
        self._idle: list[CallProcess] = []
        self._open: dict[str, CallProcess] = {}
        self._lock = threading.Lock()

    def start(self, count: int = 1) -> None:
        """Fork `count` processes now, so the environment's imports overlap the other actors' start."""
        with self._lock:
            for _ in range(count):
                self._idle.append(self._fork())

    def open(self, key: str, name: str, extras: dict[str, Any], prompt: Messages) -> Reply:
        """A new environment for trajectory `key` (a process of its own), initialised with `prompt`."""
        with self._lock:
            process = self._idle.pop() if self._idle else self._fork()
            self._open[key] = process
        return self._call(key, "open", (name, extras, prompt))

    def step(self, key: str, action: str) -> Reply:
        return self._call(key, "step", (action,))

    def close(self, key: str) -> Reply:
        """Close trajectory `key`'s environment (its metrics come back); its process serves the next one."""
        reply = self._call(key, "close", ())
        with self._lock:
            process = self._open.pop(key, None)
            if process is not None:
                self._idle.append(process)
        return reply

    def _call(self, key: str, op: str, args: tuple) -> Reply:
        start = time.perf_counter()
        process = self._open.get(key)
        if process is None:
            return Reply(False, f"{op}: no environment is open for this trajectory (its actor restarted)", 0.0, True)
        try:
            ok, value = process.call(0, (op, *args), self.timeout_s)
        except (CallTimeout, CallProcessDied) as e:
            with self._lock:
                self._open.pop(key, None)
            # A process that died is, most often, its actor going down: Ray kills a worker's children first, so this
            # thread can still answer. Lost, then: the trajectory runs again, and one whose environment itself
            # crashes fails once its restarts are spent.
            return Reply(False, f"{op}: {type(e).__name__}: {e}", time.perf_counter() - start,
                         lost=isinstance(e, CallProcessDied))
        return Reply(ok, value if ok else f"{op}: {value}", time.perf_counter() - start)

    def _fork(self) -> CallProcess:
        self._zygote = live_zygote(self._zygote)
        return self._zygote.fork(self._payload)

    def close_all(self) -> None:
        with self._lock:
            for process in [*self._idle, *self._open.values()]:
                process.stop()
            self._idle, self._open = [], {}
            if self._zygote is not None:
                self._zygote.release()
                self._zygote = None
