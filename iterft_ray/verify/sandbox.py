"""Running model-written Python contained: a bubblewrap sandbox with limits.

`run_python(code, limits)` runs `code` with this machine's Python interpreter (its
standard library only) inside `bwrap`:

- namespaces: no network (a private loopback only), own pids, IPC and hostname;
- files: read-only binds of /usr and of the interpreter's prefix (at /python), a fresh
  /proc and a minimal /dev, a private `/tmp` tmpfs of `scratch_mb` as the only writable
  place; the host's home, /tmp, /etc and every secret in them are not there at all;
- an empty environment, in bwrap and in the sandbox, so no host variable leaks;
- limits: wall time (the sandbox is killed), CPU time, address space, processes, file
  size and output (read up to `output_bytes`, then killed).

Limits are set inside the sandbox, after its namespaces exist: RLIMIT_NPROC counts the
processes of a user, and set outside it would count every process the host user runs.
Root is exempt from RLIMIT_NPROC, so when this process is root the sandbox keeps the
host's user namespace and its program drops to the unprivileged `nobody` (65534)
before it starts; otherwise bwrap's own user namespace gives it a uid of its own.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

INSTALL_HINT = (
    "install bubblewrap: `apt-get install bubblewrap` (Debian/Ubuntu), `dnf install bubblewrap` "
    "(Fedora/RHEL), `pacman -S bubblewrap` (Arch), or `make system-deps` in this repository"
)
_NOBODY = 65534
_PYTHON_IN_SANDBOX = "/python"

# Runs first in the sandbox, before the model's code: limits, then the drop to nobody.
_LAUNCHER = """
import os, resource, sys
limits, drop_to, program = {limits!r}, {drop_to!r}, sys.stdin.read()
for name, value in limits.items():
    resource.setrlimit(getattr(resource, name), (value, value))
with open("/tmp/main.py", "w") as f:
    f.write(program)
if drop_to is not None:
    os.setgroups([])
    os.setgid(drop_to)
    os.setuid(drop_to)
os.execv(sys.executable, [sys.executable, "-I", "-S", "-B", "/tmp/main.py"])
"""


@dataclass(frozen=True)
class SandboxLimits:
    """What one program in the sandbox may use. CPU is seconds of CPU time, wall of the clock."""

    wall_s: float = 10.0
    cpu_s: int = 10
    memory_mb: int = 512
    processes: int = 16
    output_bytes: int = 65536
    scratch_mb: int = 16

    def __post_init__(self) -> None:
        for name in ("wall_s", "cpu_s", "memory_mb", "processes", "output_bytes", "scratch_mb"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"sandbox {name}: expected a number > 0, got {value!r}")
        for name in ("cpu_s", "memory_mb", "processes", "output_bytes", "scratch_mb"):
            if not isinstance(getattr(self, name), int):
                raise ValueError(f"sandbox {name}: expected an integer, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class SandboxResult:
    """How a program ended: its exit code (None when the sandbox was killed), why, and its output."""

    exit_code: int | None
    output: str
    killed: str | None = None

    @property
    def passed(self) -> bool:
        return self.exit_code == 0 and self.killed is None


def run_python(code: str, limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Run `code` as a Python program in the sandbox; stdout and stderr come back together.

    Raises RuntimeError when bubblewrap is missing or cannot build the sandbox (for
    example when user namespaces are disabled), so a broken sandbox is never mistaken
    for a failing program.
    """
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise RuntimeError(f"the sandbox needs bubblewrap (`bwrap`), which is not on PATH; {INSTALL_HINT}")
    status_read, status_write = os.pipe()
    try:
        process = subprocess.Popen(
            [bwrap, *_bwrap_args(limits, status_fd=status_write), *_python_command(limits)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            pass_fds=[status_write],
            env={"PATH": "/usr/bin:/bin"},
            start_new_session=True,
        )
    finally:
        os.close(status_write)
    with open(status_read, "rb") as status:
        try:
            output, killed = _feed_and_read(process, code.encode(), limits)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)  # bwrap; --die-with-parent takes the sandbox along
            process.wait()
        events = [json.loads(line) for line in status.read().decode().splitlines() if line.strip()]
    started = [e["child-pid"] for e in events if "child-pid" in e]
    if not started and killed is None:
        raise RuntimeError(f"bubblewrap could not start the sandbox: {output.strip()}")
    if started:
        _wait_until_gone(started[0])
    exit_codes = [e["exit-code"] for e in events if "exit-code" in e]
    exit_code = exit_codes[0] if exit_codes and killed is None else None
    return SandboxResult(exit_code, output, killed)


def _bwrap_args(limits: SandboxLimits, status_fd: int) -> list[str]:
    prefix = Path(sys.base_prefix).resolve()
    if os.geteuid() == 0:
        # Keep the host user namespace so the program can drop to a uid that
        # RLIMIT_NPROC applies to; bwrap drops every other capability.
        namespaces = ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try",
                      "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        namespaces = ["--unshare-all", "--unshare-user", "--disable-userns"]
    return [
        *namespaces,
        "--die-with-parent", "--new-session", "--clearenv",
        "--json-status-fd", str(status_fd),
        "--ro-bind", "/usr", "/usr",
        "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64", "--symlink", "usr/bin", "/bin",
        "--ro-bind", str(prefix), _PYTHON_IN_SANDBOX,
        "--proc", "/proc", "--dev", "/dev",
        "--perms", "1777", "--size", str(limits.scratch_mb * 2**20), "--tmpfs", "/tmp",
        "--remount-ro", "/", "--remount-ro", "/dev",  # /tmp is the one writable (sized) place
        "--chdir", "/tmp",
        "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/tmp", "--setenv", "LANG", "C.UTF-8",
        # The interpreter may find libpython by an absolute path under its real prefix.
        "--setenv", "LD_LIBRARY_PATH", f"{_PYTHON_IN_SANDBOX}/lib",
    ]


def _python_command(limits: SandboxLimits) -> list[str]:
    prefix = Path(sys.base_prefix).resolve()
    executable = Path(os.path.realpath(sys.executable))
    if not executable.is_relative_to(prefix):
        raise RuntimeError(f"sandbox: the interpreter {executable} is not under its prefix {prefix}")
    rlimits = {
        "RLIMIT_CPU": limits.cpu_s,
        "RLIMIT_AS": limits.memory_mb * 2**20,
        "RLIMIT_NPROC": limits.processes,
        "RLIMIT_FSIZE": limits.scratch_mb * 2**20,
        "RLIMIT_NOFILE": 256,
        "RLIMIT_CORE": 0,
    }
    drop_to = _NOBODY if os.geteuid() == 0 else None
    launcher = _LAUNCHER.format(limits=rlimits, drop_to=drop_to)
    return [f"{_PYTHON_IN_SANDBOX}/{executable.relative_to(prefix)}", "-I", "-S", "-B", "-c", launcher]


def _feed_and_read(process: subprocess.Popen, program: bytes, limits: SandboxLimits) -> tuple[str, str | None]:
    """Send the program, then read output until exit, the wall time or the output limit."""
    deadline = time.monotonic() + limits.wall_s
    try:
        process.stdin.write(program)
        process.stdin.close()
    except BrokenPipeError:
        pass  # the sandbox ended early; its output says why
    chunks, size, killed = [], 0, None
    fd = process.stdout.fileno()
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            killed = f"wall time over {limits.wall_s:g}s"
            break
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
        if size > limits.output_bytes:
            killed = f"output over {limits.output_bytes} bytes"
            break
    process.stdout.close()
    output = b"".join(chunks)[: limits.output_bytes].decode("utf-8", "replace")
    return output, killed


def _wait_until_gone(init_pid: int, limit_s: float = 10.0) -> None:
    """Wait for the sandbox's first process (the init of its pid namespace) to exit.

    Killing bwrap makes the kernel kill that process, and with it every process of the
    namespace, but not at once; once the init has exited (or is a zombie, when nothing
    on the host reaps it) the namespace is empty and nothing of the sandbox is left.
    """
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            stat = Path(f"/proc/{init_pid}/stat").read_text()
        except FileNotFoundError:
            return
        if stat.rpartition(")")[2].split()[0] in ("Z", "X"):
            return
        time.sleep(0.01)
