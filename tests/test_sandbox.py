"""The sandbox contains hostile programs by its OS-level layers, not by the in-process guard.

Every hostile program here reaches past the guard (``posix``, ``ctypes``) and is harmless even if
containment failed: bounded loops, short sleeps, lazily backed allocations, a few MiB of disk.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from lmforge.errors import ConfigError
from lmforge.eval.sandbox import SandboxConfig, check_completion, run_program

# one problem in the published openai_humaneval format
PROBLEM = {
    "task_id": "Test/0",
    "prompt": 'def add(a: int, b: int) -> int:\n    """The sum of a and b."""\n',
    "canonical_solution": "    return a + b\n",
    "test": "\n\nMETADATA = {}\n\n\ndef check(candidate):\n    assert candidate(2, 3) == 5\n"
            "    assert candidate(-1, 1) == 0\n",
    "entry_point": "add",
}


@pytest.fixture(scope="module")
def config() -> SandboxConfig:
    """Small limits, and an interpreter the sandbox user can run: the venv's base interpreter
    may sit under a private home, the system one is the documented way out."""
    reason = ""
    for interpreter in ("", "/usr/bin/python3"):
        candidate = SandboxConfig(timeout_s=2.0, cpu_s=5, memory_mb=512, file_size_mb=8,
                                  open_files=32, processes=16, interpreter=interpreter)
        try:
            run_program("pass", candidate)
            return candidate
        except ConfigError as e:
            reason = str(e)
    pytest.skip(f"no Python this sandbox can run: {reason}")


@pytest.fixture(scope="module")
def isolated(config: SandboxConfig) -> SandboxConfig:
    """The config with every layer: uid drop and namespaces (root only)."""
    if os.geteuid() != 0:
        pytest.skip("the uid, PID- and network-namespace layers need the evaluator to be root")
    strict = replace(config, network_isolation="require")
    try:
        run_program("pass", strict)
    except ConfigError as e:
        pytest.skip(f"namespaces are not allowed here: {e}")
    return strict


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory every user can enter but only the evaluator can write (unlike ``tmp_path``,
    whose parents are private, so a program could not even see a canary in it)."""
    path = Path(tempfile.mkdtemp(prefix="sandbox-canary-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def processes_in(directory: str) -> list[int]:
    """Processes whose working directory is (or was, before its deletion) ``directory``."""
    pids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if os.readlink(f"/proc/{entry.name}/cwd").startswith(directory):
                    pids.append(int(entry.name))
            except OSError:  # gone meanwhile, or a kernel thread
                pass
    return pids


def test_correct_completion_passes_and_wrong_one_fails(config: SandboxConfig) -> None:
    args = PROBLEM["prompt"], PROBLEM["test"], PROBLEM["entry_point"]
    good = check_completion(args[0], PROBLEM["canonical_solution"], *args[1:], config=config)
    bad = check_completion(args[0], "    return a - b\n", *args[1:], config=config)
    assert (good.status, good.returncode) == ("passed", 0), good.stderr
    assert bad.status == "failed" and "AssertionError" in bad.stderr


def test_environment_is_scrubbed_and_guard_installed(config: SandboxConfig) -> None:
    result = run_program("import os, posix, shutil\n"
                         "print(sorted(os.environ), os.environ['PYTHONHASHSEED'])\n"
                         "print(posix.getcwd() == os.environ['HOME'])\n"
                         "print(os.kill, os.system, shutil.rmtree)\n", config)
    assert result.status == "passed", result.stderr
    names, same_home, guarded = result.stdout.splitlines()
    assert names == "['HOME', 'LANG', 'PATH', 'PYTHONDONTWRITEBYTECODE', 'PYTHONHASHSEED'] 0"
    assert same_home == "True"
    assert guarded == "None None None"


def test_infinite_loop_times_out(config: SandboxConfig) -> None:
    result = run_program("while True:\n    pass\n", config)
    assert result.status == "timeout"
    assert config.timeout_s <= result.seconds < config.timeout_s + 1.0


def test_cpu_limit_stops_a_spinning_program_before_the_timeout(config: SandboxConfig) -> None:
    result = run_program("while True:\n    pass\n", replace(config, timeout_s=5.0, cpu_s=1))
    assert result.status == "failed"
    assert result.returncode in (128 + signal.SIGXCPU, 128 + signal.SIGKILL)
    assert result.seconds < 4.0


def test_memory_bomb_raises_memory_error(config: SandboxConfig) -> None:
    result = run_program("data = bytearray(4 << 30)\n", config)
    assert result.status == "failed"
    assert "MemoryError" in result.stderr


def test_file_bomb_is_cut_at_the_size_limit_and_the_directory_removed(
        config: SandboxConfig) -> None:
    program = ("import posix\n"
               "print(posix.getcwd(), flush=True)\n"
               "with open('big', 'wb') as f:\n"
               "    try:\n"
               "        for _ in range(1024):\n"
               "            f.write(bytes(1 << 20))\n"
               "            f.flush()\n"
               "    finally:\n"
               "        print(posix.stat('big').st_size, flush=True)\n")
    result = run_program(program, config)
    assert result.status == "failed"
    assert "File too large" in result.stderr
    workdir, size = result.stdout.split()
    assert int(size) <= config.file_size_mb << 20
    assert not os.path.exists(workdir)


def test_locked_directory_is_removed(config: SandboxConfig) -> None:
    program = ("import posix\n"
               "print(posix.getcwd())\n"
               "posix.mkdir('a')\n"
               "open('a/b', 'w').close()\n"
               "posix.chmod('a', 0)\n"
               "posix.chmod('.', 0o500)\n")
    result = run_program(program, config)
    assert result.status == "passed", result.stderr
    assert not os.path.exists(result.stdout.strip())


def test_killing_its_parent_spares_the_evaluator(config: SandboxConfig) -> None:
    program = ("import posix, signal\n"
               "posix.kill(posix.getppid(), signal.SIGKILL)\n"
               "raise SystemExit('still running')\n")
    result = run_program(program, config)
    assert result.status in ("failed", "error")
    assert run_program("pass", config).status == "passed"  # this process and its sandbox live


@pytest.mark.parametrize("then", ["exits", "hangs"])
def test_fork_bomb_is_capped_and_leaves_nothing_behind(isolated: SandboxConfig,
                                                       then: str) -> None:
    program = ("import posix, sys, time\n"
               "print(posix.getcwd(), flush=True)\n"
               "forks = 0\n"
               "for _ in range(200):\n"
               "    try:\n"
               "        pid = posix.fork()\n"
               "    except OSError:\n"
               "        break\n"
               "    if pid == 0:\n"
               "        posix.setsid()  # out of the process group: only the PID namespace\n"
               "        time.sleep(20)\n"
               "        posix._exit(0)\n"
               "    forks += 1\n"
               "print(forks, flush=True)\n"
               f"time.sleep(20 if {then == 'hangs'} else 0)\n"
               "sys.exit(1)\n")
    result = run_program(program, isolated)
    assert result.status == ("timeout" if then == "hangs" else "failed")
    workdir, forks = result.stdout.split()
    assert int(forks) < isolated.processes
    assert processes_in(workdir) == []


def test_cannot_signal_other_processes(isolated: SandboxConfig) -> None:
    with subprocess.Popen(["sleep", "30"]) as bystander:
        try:
            result = run_program(f"import posix\nposix.kill({bystander.pid}, 9)\n", isolated)
            assert bystander.poll() is None
        finally:
            bystander.kill()
    assert result.status == "failed"
    # another PID namespace: no such process; another uid: not permitted
    assert "ProcessLookupError" in result.stderr or "PermissionError" in result.stderr


def test_cannot_delete_a_file_outside_its_directory(isolated: SandboxConfig,
                                                    shared_dir: Path) -> None:
    canary = shared_dir / "canary.txt"
    canary.write_text("alive")
    canary.chmod(0o644)
    program = ("import ctypes, posix\n"
               f"path = {str(canary)!r}\n"
               "print(posix.stat(path).st_size)  # it can see the canary...\n"
               "print(ctypes.CDLL(None).unlink(path.encode()))  # ...libc fails quietly...\n"
               "posix.unlink(path)  # ...and the bypassed guard loudly\n")
    result = run_program(program, isolated)
    assert result.status == "failed"
    assert result.stdout.split() == ["5", "-1"]
    assert "PermissionError" in result.stderr
    assert canary.read_text() == "alive"


def test_has_no_network(isolated: SandboxConfig) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        result = run_program("import socket\n"
                             f"socket.create_connection(('127.0.0.1', {port}), timeout=1)\n",
                             isolated)
        assert select.select([server], [], [], 0)[0] == []  # nothing waits to be accepted
    assert result.status == "failed"
    assert "Network is unreachable" in result.stderr


def test_runs_as_the_unprivileged_user(isolated: SandboxConfig) -> None:
    result = run_program("import posix\nprint(posix.getuid(), posix.getgroups())\n", isolated)
    assert result.stdout.split() == ["65534", "[]"]


def test_interpreter_the_user_cannot_reach_is_a_clear_config_error(
        isolated: SandboxConfig) -> None:
    private = Path(tempfile.mkdtemp(prefix="sandbox-private-"))  # mode 0700
    try:
        python = private / "python"
        python.write_text(f"#!/bin/sh\nexec {isolated.interpreter or sys.executable} \"$@\"\n")
        python.chmod(0o755)
        with pytest.raises(ConfigError, match=f"{private} .mode 0700. is not searchable"):
            run_program("pass", replace(isolated, interpreter=str(python)))
    finally:
        shutil.rmtree(private)


@pytest.mark.parametrize("field, value", [("timeout_s", 0.0), ("memory_mb", 0),
                                          ("processes", 0), ("user", "root"),
                                          ("network_isolation", "off")])
def test_bad_config_is_rejected(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field):
        SandboxConfig(**{field: value})
