"""Run model-written programs (HumanEval completions) so that hostile ones stay contained.

openai/human-eval (``execution.py``) ``exec``s each completion in a forked child after
``reliability_guard``, which sets ``os.kill``, ``shutil.rmtree``, ``subprocess.Popen``… to None and
warns that it "is NOT a security sandbox": ``__import__('posix').kill`` or ``ctypes`` reach the
originals, and it sets no memory limit by default. Here that guard is only the last of seven
layers; the tests check the others with programs that bypass it.

1. Process tree: each program runs in a new session (its own process group) under a wall-clock
   timeout, and the whole group gets SIGKILL at the end. Where the OS allows namespaces (root),
   the program is also PID 1 of a new PID namespace: when it dies the kernel kills everything it
   started, even children that left the group with ``setsid``, and it cannot see a process
   outside to signal it.
2. rlimits per process: CPU seconds, address space (``MemoryError``, not a swapping host), file
   size (stdout and stderr too), open files, processes (RLIMIT_NPROC counts per uid, so it caps
   fork bombs across all concurrent programs), no core dumps.
3. A fresh temporary directory as cwd and HOME, removed afterwards whatever modes it was left in.
4. A scrubbed environment: PATH, HOME, LANG, PYTHONHASHSEED=0 (reproducible set order) and
   PYTHONDONTWRITEBYTECODE. Programs run with ``-s -P``, isolated mode (``-I``) minus ``-E``:
   that would drop PYTHONHASHSEED, and the environment it ignores is already ours.
5. No network: a new network namespace (only a loopback, down); where ``unshare(2)`` is refused,
   ``network_isolation="auto"`` warns once that the network is NOT isolated.
6. Run as root, the program runs as an unprivileged ``user`` with no supplementary groups and
   ``no_new_privs``: RLIMIT_NPROC applies (root is exempt), it cannot write outside its
   directory (save world-writable places such as /tmp) nor signal the evaluator. That user must
   be able to run the interpreter: the base one (a virtualenv adds nothing, programs use only
   the stdlib), probed once per config; an unusable one is a ConfigError naming what blocks it.
7. The reference's in-process guard, against accidents rather than attacks.

Why a launcher, not ``preexec_fn``: code between fork and exec in a process that may run threads
(torch, tokenizers) can deadlock on a lock another thread held, and a PID namespace only applies
to children forked after ``unshare``. So ``subprocess`` does only its async-signal-safe
``setsid``, and a small Python launcher (``-I -S``, as the evaluator's user) unshares, forks the
program's process (limits, drop to ``user``, exec) and enforces the timeout: waiting for the init
of a PID namespace returns once every process in it is gone, so nothing outlives the call.

Not covered: filling the disk with many files under the size limit (needs a quota or a tmpfs);
memory is per process (at most memory_mb × processes). Without root there is no PID namespace
nor uid drop: a program may signal the evaluator's processes, ``setsid`` children outlive it.
Linux only (namespaces, prctl, pidfd).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import pwd
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from contextlib import suppress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Literal

from lmforge.config import check_at_least, option
from lmforge.errors import ConfigError

log = logging.getLogger(__name__)

TAIL_BYTES = 4096  # of stdout and of stderr kept in a ProgramResult
_SETUP_FAILED, _NO_NAMESPACES = 121, 122  # launcher's own exit codes; the program's pass through
_GRACE_S = 1.0  # the launcher enforces timeout_s; the evaluator kills it this much later

# Layer 7, after reliability_guard in openai/human-eval execution.py; then the program itself.
_GUARD = """\
import builtins, faulthandler, os, shutil, subprocess, sys
faulthandler.disable()
for name in ("kill", "killpg", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir",
             "setuid", "fork", "forkpty", "rename", "renames", "truncate", "replace", "unlink",
             "fchmod", "fchown", "chmod", "chown", "chroot", "lchown", "getcwd", "chdir"):
    setattr(os, name, None)
shutil.rmtree = shutil.move = shutil.chown = subprocess.Popen = None
builtins.exit = builtins.quit = builtins.help = None
for name in ("ipdb", "joblib", "resource", "psutil", "tkinter"):
    sys.modules[name] = None
with open("program.py", encoding="utf-8") as f:
    exec(compile(f.read(), "program.py", "exec"), {"__name__": "__main__"})
"""

# argv[1]: {"namespaces", "limits": [[name, soft, hard]], "uid", "gid", "argv", "timeout"}
_LAUNCHER = """\
import ctypes, json, os, resource, select, signal, sys
p = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
def fail(code, what):
    os.write(2, f"sandbox: {what}\\n".encode())
    os._exit(code)
if p["namespaces"] and libc.unshare(0x40000000 | 0x20000000):  # CLONE_NEWNET | CLONE_NEWPID
    fail(122, "unshare: " + os.strerror(ctypes.get_errno()))
pid = os.fork()
if pid == 0:
    try:
        for name, soft, hard in p["limits"]:
            resource.setrlimit(getattr(resource, name), (soft, hard))
        if p["uid"] is not None:
            os.setgroups([])
            os.setgid(p["gid"])
            os.setuid(p["uid"])
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG (setuid clears it): die with us
        libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS: setuid binaries grant nothing
        os.execv(p["argv"][0], p["argv"])
    except (OSError, ValueError) as e:
        fail(121, e)
if not select.select([os.pidfd_open(pid)], [], [], p["timeout"])[0]:
    os.kill(pid, signal.SIGKILL)
code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
sys.exit(code if code >= 0 else 128 - code)
"""


@dataclass(frozen=True)
class SandboxConfig:
    """Limits and isolation for each program; the module docstring explains every layer."""

    timeout_s: float = option(10.0, "wall-clock seconds before the program and all it started "
                                    "are killed")
    cpu_s: int = option(10, "CPU seconds per process (RLIMIT_CPU; SIGKILL one second later)")
    memory_mb: int = option(1024, "address space per process, MiB (RLIMIT_AS): larger "
                                  "allocations raise MemoryError")
    file_size_mb: int = option(16, "largest file a program may write, stdout and stderr "
                                   "included (RLIMIT_FSIZE)")
    open_files: int = option(64, "open file descriptors per process (RLIMIT_NOFILE)")
    processes: int = option(64, "processes of the sandbox user at once, all running programs "
                                "together (RLIMIT_NPROC)")
    network_isolation: Literal["auto", "require"] = option(
        "auto", "auto: a new network namespace where the OS allows it (root), else warn once "
                "that the network is NOT isolated; require: refuse to run without one")
    user: str = option("nobody", "unprivileged account (name or uid) that programs run as when "
                                 "the evaluator runs as root")
    interpreter: str = option("", "Python that runs the programs (stdlib only); empty: the base "
                                  "interpreter of this one (not its virtualenv), else the "
                                  "system's python3, whichever the sandbox user can run")

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise ConfigError(f"timeout_s: must be > 0, got {self.timeout_s!r}")
        check_at_least(self, 1, "cpu_s", "memory_mb", "file_size_mb", "open_files", "processes")
        if self.network_isolation not in ("auto", "require"):
            raise ConfigError(f"network_isolation: {self.network_isolation!r} is not one of "
                              "'auto', 'require'")
        if self.user in ("", "root", "0"):
            raise ConfigError(f"user: must be an unprivileged account, got {self.user!r}")


@dataclass(frozen=True)
class ProgramResult:
    """What became of one program."""

    # passed: exit 0 in time; failed: any other end; timeout: killed at timeout_s;
    # error: the sandbox could not start it
    status: Literal["passed", "failed", "timeout", "error"]
    returncode: int | None  # the program's exit code, 128 + N if signal N killed it
    stdout: str  # the last TAIL_BYTES of each
    stderr: str
    seconds: float  # wall clock


@dataclass(frozen=True)
class _Plan:
    """How programs of one config run here, once probed."""

    interpreter: str
    uid: int | None  # None: run as the evaluator's user (not root)
    gid: int | None
    namespaces: bool


def run_program(source: str, config: SandboxConfig) -> ProgramResult:
    """Run Python ``source`` in the sandbox. Never raises for what the program does; raises
    ConfigError once if this machine cannot run ``config`` (interpreter, user, namespaces)."""
    return _run(source, config, _prepare(config))


def check_completion(prompt: str, completion: str, test: str, entry_point: str,
                     config: SandboxConfig) -> ProgramResult:
    """Run one HumanEval completion against its tests, as openai/human-eval builds the program
    from a published row (``prompt``, ``test`` defining ``check``, ``entry_point``)."""
    return run_program(prompt + completion + "\n" + test + "\n" + f"check({entry_point})\n",
                       config)


@functools.cache
def _prepare(config: SandboxConfig) -> _Plan:
    """Probe the config with an empty program: namespaces allowed? interpreter usable?"""
    if not sys.platform.startswith("linux"):
        raise ConfigError(f"the sandbox needs Linux (namespaces, prctl, pidfd), not {sys.platform}")
    uid = gid = None
    if os.geteuid() == 0:
        if config.user.isdigit():
            uid = gid = int(config.user)
        else:
            try:
                uid, gid = pwd.getpwnam(config.user)[2:4]
            except KeyError:
                raise ConfigError(f"user: no account {config.user!r} here; name an "
                                  "unprivileged one, e.g. nobody") from None
    interpreter = _interpreter(config, uid, gid)
    if not os.access(interpreter, os.X_OK):
        raise ConfigError(f"interpreter: {interpreter} is not an executable file")
    plan = _Plan(interpreter, uid, gid, namespaces=True)
    probe = _run("pass", config, plan)
    if probe.returncode == _NO_NAMESPACES:
        why = probe.stderr.strip().removeprefix("sandbox: ")
        if config.network_isolation == "require":
            raise ConfigError(f"network_isolation: 'require', but no network namespace is "
                              f"allowed here ({why}); run as root or use 'auto'")
        log.warning("sandbox: the network is NOT isolated from programs (%s); run as root to "
                    "isolate it", why)
        plan = replace(plan, namespaces=False)
        probe = _run("pass", config, plan)
    if probe.status != "passed":
        blocked = _blocked(interpreter, uid, gid) if uid is not None else None
        why = (f"{blocked} is not searchable by uid {uid}" if blocked else
               (probe.stderr.strip().splitlines() or [f"exit code {probe.returncode}"])[-1])
        raise ConfigError(f"interpreter: {interpreter} cannot run programs in the sandbox "
                          f"({why}); set interpreter= to a Python that user can run, "
                          "e.g. /usr/bin/python3")
    return plan


def _interpreter(config: SandboxConfig, uid: int | None, gid: int | None) -> str:
    """``config.interpreter``, or the first of this Python's base interpreter and the system's
    ``python3`` that the sandbox user can run (a pyenv or virtualenv under a 0700 home cannot)."""
    if config.interpreter:
        return os.path.realpath(config.interpreter)
    candidates = [os.path.realpath(p) for p in (sys._base_executable, "/usr/bin/python3",
                                                shutil.which("python3")) if p]
    if uid is None:
        return candidates[0]
    return next((c for c in candidates if os.access(c, os.X_OK)
                 and _blocked(c, uid, gid) is None), candidates[0])


def _blocked(path: str, uid: int, gid: int | None) -> str | None:
    """The first directory on ``path``, or the file, that ``uid``/``gid`` may not enter/run."""
    for part in [*reversed(Path(path).parents), Path(path)]:
        st = part.stat()
        shift = 6 if st.st_uid == uid else 3 if st.st_gid == gid else 0
        if not (st.st_mode >> shift) & 1:
            return f"{part} (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def _run(source: str, config: SandboxConfig, plan: _Plan) -> ProgramResult:
    workdir = tempfile.mkdtemp(prefix="lmforge-sandbox-")
    try:
        program = Path(workdir, "program.py")
        program.write_text(source, encoding="utf-8")
        if plan.uid is not None:
            for path in (workdir, program):
                os.chown(path, plan.uid, plan.gid)
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "LANG": "C.UTF-8",
               "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}
        mb = 1 << 20
        limits = [("RLIMIT_CPU", config.cpu_s, config.cpu_s + 1),
                  ("RLIMIT_AS", config.memory_mb * mb, config.memory_mb * mb),
                  ("RLIMIT_FSIZE", config.file_size_mb * mb, config.file_size_mb * mb),
                  ("RLIMIT_NOFILE", config.open_files, config.open_files),
                  ("RLIMIT_NPROC", config.processes, config.processes),
                  ("RLIMIT_CORE", 0, 0)]
        params = {"namespaces": plan.namespaces, "limits": limits, "uid": plan.uid,
                  "gid": plan.gid, "timeout": config.timeout_s,
                  "argv": [plan.interpreter, "-s", "-P", "-c", _GUARD]}
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            start = time.monotonic()
            try:
                launcher = subprocess.Popen(
                    [plan.interpreter, "-I", "-S", "-c", _LAUNCHER, json.dumps(params)],
                    cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                    start_new_session=True)
            except OSError as e:
                return ProgramResult("error", None, "", f"sandbox: {e}", 0.0)
            late = _wait_and_kill(launcher, config.timeout_s + _GRACE_S)
            seconds = time.monotonic() - start
            stdout, stderr = _tail(out), _tail(err)
    finally:
        _remove(workdir, plan)
    code = launcher.returncode
    if code == 0 and not late:
        status = "passed"
    elif late or seconds >= config.timeout_s:
        status = "timeout"
    elif code in (_SETUP_FAILED, _NO_NAMESPACES):
        status = "error"
    else:
        status = "failed"
    return ProgramResult(status, code, stdout, stderr, seconds)


def _wait_and_kill(launcher: subprocess.Popen, timeout: float) -> bool:
    """Wait up to ``timeout`` s for the launcher to exit, then SIGKILL its whole process group
    while its zombie still holds the group id (so the id cannot have been reused) and reap it.
    True if it was still running."""
    pidfd = os.pidfd_open(launcher.pid)
    try:
        return not select.select([pidfd], [], [], timeout)[0]
    finally:  # even on KeyboardInterrupt: nothing outlives the call
        os.close(pidfd)
        with suppress(ProcessLookupError):
            os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait()


def _tail(file: IO[bytes]) -> str:
    size = file.seek(0, os.SEEK_END)
    file.seek(max(0, size - TAIL_BYTES))
    return file.read().decode("utf-8", errors="replace")


def _remove(workdir: str, plan: _Plan) -> None:
    """Delete the program's directory however deep it nested it or whatever modes it set
    (coreutils, because Python 3.11's rmtree recurses and cannot enter a mode-000 directory)."""
    if plan.uid is None:  # root needs no permissions back; the evaluator's own user does
        subprocess.run(["chmod", "-R", "u+rwx", workdir], capture_output=True, check=False)
    subprocess.run(["rm", "-rf", workdir], capture_output=True, check=False)
    if os.path.lexists(workdir):
        log.warning("sandbox: could not remove %s", workdir)
