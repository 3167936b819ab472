"""The sandbox contains what a model's code tries: each escape is attempted for real, and the host checked."""

import os
import socket
import threading
import uuid
from pathlib import Path

import pyarrow as pa
import pytest

from iterft_ray.verify.filters import resolve_filter
from iterft_ray.verify.scoring import score_rollouts
from iterft_ray.verify.sandbox import SandboxLimits, run_python

QUICK = SandboxLimits(wall_s=5, cpu_s=2, memory_mb=256, processes=8, output_bytes=4096)


def _sandbox_processes() -> list[int]:
    """Host pids of programs the sandbox runs (it runs them as /tmp/main.py)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and b"/tmp/main.py" in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def test_a_program_runs_and_its_exit_code_and_output_come_back():
    result = run_python("print('hello')\nraise SystemExit(3)", QUICK)

    assert result.exit_code == 3 and result.killed is None
    assert result.output == "hello\n"
    assert run_python("import json, math, collections; print(math.gcd(12, 18))", QUICK).passed


def test_an_infinite_loop_is_stopped_by_the_cpu_limit():
    result = run_python("while True:\n    pass", SandboxLimits(wall_s=60, cpu_s=1))

    assert result.killed is None  # the CPU limit, not the wall clock, ended it
    assert result.exit_code not in (0, None)
    assert not result.passed


def test_a_sleeping_program_is_killed_at_the_wall_time():
    result = run_python("import time\nprint('start', flush=True)\ntime.sleep(600)", SandboxLimits(wall_s=1))

    assert result.killed == "wall time over 1s"
    assert result.exit_code is None and result.output == "start\n"
    assert _sandbox_processes() == []


def test_a_fork_bomb_hits_the_process_limit_and_leaves_nothing_behind():
    counted = run_python(
        "import os, time\n"
        "for i in range(100):\n"
        "    try:\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(60)\n"
        "            os._exit(0)\n"
        "    except OSError:\n"
        "        break\n"
        "print(i)\n",
        QUICK,
    )
    bomb = run_python("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass", QUICK)

    assert counted.exit_code == 0
    assert int(counted.output) < QUICK.processes  # the program itself is one of them
    assert bomb.killed == "wall time over 5s"
    assert _sandbox_processes() == []
    assert run_python("print(1)", QUICK).output == "1\n"  # the host can still start processes


def test_a_memory_hog_gets_a_memory_error():
    result = run_python("hog = bytearray(1024 * 2**20)\nprint('allocated')", QUICK)

    assert result.exit_code == 1
    assert "MemoryError" in result.output and "allocated" not in result.output


def test_huge_output_is_cut_at_the_limit_and_the_program_killed():
    result = run_python("while True:\n    print('x' * 1000)", QUICK)

    assert result.killed == f"output over {QUICK.output_bytes} bytes"
    assert len(result.output) == QUICK.output_bytes
    assert _sandbox_processes() == []


def test_killing_its_parent_or_every_process_reaches_nothing_outside(tmp_path):
    program = (
        "import os, signal\n"
        f"for pid in ({os.getpid()}, {os.getppid()}):\n"
        "    try:\n"
        "        os.kill(pid, signal.SIGKILL)\n"
        "    except ProcessLookupError:\n"
        "        print('no such process', pid)\n"
        "for pid in (os.getppid(), 1, -1):\n"
        "    try:\n"
        "        os.kill(pid, signal.SIGKILL)\n"
        "    except OSError as e:\n"
        "        print(type(e).__name__)\n"
    )

    result = run_python(program, QUICK)

    assert f"no such process {os.getpid()}" in result.output  # the host's pids are not even visible
    assert f"no such process {os.getppid()}" in result.output
    assert run_python("print('still works')", QUICK).output == "still works\n"


def test_the_host_home_temp_and_secrets_are_not_visible(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("hunter2")
    home = Path.home()
    program = (
        "import os\n"
        f"for path in ({str(home / '.ray' / 'auth_token')!r}, {str(secret)!r}, '/etc/passwd', '/etc/shadow'):\n"
        "    try:\n"
        "        print(open(path).read())\n"
        "    except OSError as e:\n"
        "        print(type(e).__name__, path)\n"
        f"for path in ({str(home)!r}, {str(tmp_path)!r}, '/root', '/home', '/work', '/etc'):\n"
        "    print(path, os.path.exists(path))\n"
        "print('tmp', os.listdir('/tmp'))\n"
    )

    result = run_python(program, QUICK)

    assert "hunter2" not in result.output
    assert f"FileNotFoundError {home / '.ray' / 'auth_token'}" in result.output
    assert f"FileNotFoundError {secret}" in result.output
    for path in (home, tmp_path, "/root", "/home", "/work", "/etc"):
        assert f"{path} False" in result.output
    assert "tmp ['main.py']" in result.output  # a private, empty scratch dir


def test_the_host_environment_is_not_visible(monkeypatch):
    monkeypatch.setenv("ITERFT_TEST_SECRET", "s3cr3t-value")
    program = (
        "import os, pathlib\n"
        "print(dict(os.environ))\n"
        "for p in pathlib.Path('/proc').glob('[0-9]*/environ'):\n"
        "    try:\n"
        "        print(p, p.read_bytes())\n"
        "    except OSError as e:\n"
        "        print(p, type(e).__name__)\n"
    )

    result = run_python(program, QUICK)

    assert result.exit_code == 0
    assert "s3cr3t-value" not in result.output and "ITERFT_TEST_SECRET" not in result.output
    assert "PATH" in result.output  # it did print its environment


def test_writes_stay_in_the_sandbox(tmp_path):
    name = f"iterft-escape-{uuid.uuid4().hex}"
    program = (
        "import os\n"
        f"for path in ('/tmp/{name}', {str(tmp_path / name)!r}, '/{name}', '/usr/{name}', '/python/{name}',\n"
        f"             '/dev/shm/{name}', '/dev/{name}'):\n"
        "    try:\n"
        "        os.makedirs(os.path.dirname(path), exist_ok=True)\n"
        "        open(path, 'w').write('x')\n"
        "        print('wrote', path)\n"
        "    except OSError as e:\n"
        "        print(type(e).__name__, path)\n"
    )

    result = run_python(program, QUICK)

    assert f"wrote /tmp/{name}" in result.output  # the private scratch dir is writable
    for path in (f"/{name}", f"/usr/{name}", f"/python/{name}", f"/dev/shm/{name}", f"/dev/{name}"):
        assert f"wrote {path}" not in result.output and f"Error {path}" in result.output
    assert not Path("/tmp", name).exists()
    assert not (tmp_path / name).exists()
    assert list(tmp_path.iterdir()) == []
    assert not Path("/", name).exists() and not Path("/usr", name).exists()


def test_a_local_port_cannot_be_reached():
    server = socket.create_server(("127.0.0.1", 0))
    server.setblocking(False)
    port = server.getsockname()[1]
    program = (
        "import socket\n"
        "for host in ('127.0.0.1', 'localhost', '8.8.8.8'):\n"
        "    try:\n"
        f"        socket.create_connection((host, {port}), timeout=2)\n"
        "        print('connected', host)\n"
        "    except OSError as e:\n"
        "        print(type(e).__name__, host)\n"
    )
    try:
        result = run_python(program, QUICK)
        with pytest.raises(BlockingIOError):
            server.accept()  # nobody connected
    finally:
        server.close()

    assert "connected" not in result.output
    assert "ConnectionRefusedError 127.0.0.1" in result.output


def test_a_missing_bubblewrap_is_an_error_naming_it(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))

    with pytest.raises(RuntimeError, match="bubblewrap.*apt-get install bubblewrap"):
        run_python("print(1)", QUICK)


def _code_rollouts(completions: list[str], tests: str) -> pa.Table:
    return pa.table(
        {
            "prompt_id": list(range(len(completions))),
            "prompt": ["Write add(a, b)."] * len(completions),
            "completion": completions,
            "tests": [tests] * len(completions),
        }
    )


def test_python_tests_accepts_programs_that_pass_their_tests():
    tests = "assert add(2, 3) == 5\nassert add(-1, 1) == 0"
    completions = [
        "def add(a, b):\n    return a + b",
        "Here it is:\n```python\ndef add(a, b):\n    return a + b\n```\nDone.",
        "def add(a, b):\n    return a - b",
        "def add(a, b):\n    while True:\n        pass",
        "import subprocess\nsubprocess.run(['ls', '/'])\ndef add(a, b):\n    return a + b",
        "def add(a, b):\n    return a +",
    ]

    scored = score_rollouts(
        _code_rollouts(completions, tests), [{"name": "python_tests", "wall_s": 5, "cpu_s": 1}], timeout_s=30
    )

    assert scored["accepted"].to_pylist() == [True, True, False, False, True, False]
    assert scored["filter_error"].to_pylist() == [None] * 6


def test_python_tests_works_from_a_thread_and_reports_a_missing_sandbox_as_an_error(monkeypatch, tmp_path):
    check = resolve_filter({"name": "python_tests", "wall_s": 5})
    meta = {"tests": "assert add(2, 3) == 5"}
    results = []
    thread = threading.Thread(target=lambda: results.append(check("", "def add(a, b): return a + b", meta)))
    thread.start()
    thread.join()
    monkeypatch.setenv("PATH", str(tmp_path))

    scored = score_rollouts(_code_rollouts(["def add(a, b): return a + b"], meta["tests"]), [check])

    assert results == [True]
    assert scored["accepted"].to_pylist() == [False]
    assert "python_tests" in scored["filter_error"][0].as_py() and "bubblewrap" in scored["filter_error"][0].as_py()


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"name": "python_tests", "wall_s": 0}, "'python_tests'.*wall_s"),
        ({"name": "python_tests", "memory_mb": 1.5}, "'python_tests'.*memory_mb"),
        ({"name": "python_tests", "timeout": 3}, "'python_tests'.*timeout"),
    ],
)
def test_bad_python_tests_options_are_errors_naming_them(spec, message):
    with pytest.raises(ValueError, match=message):
        resolve_filter(spec)
