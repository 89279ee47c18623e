"""Where the tasks of ``lmforge data prepare`` run: a local process pool, or a Ray cluster.

An executor runs a stage: one function over a list of argument tuples, every task independent,
and returns their results in order once all are done. Tasks share nothing but the files under the
run's work directory, so on Ray the output directory must be on storage every node sees (a shared
or network file system). A task's outputs are written whole or not at all and it skips what is
already there, so a task may run twice: Ray reruns one whose worker died (``max_retries``), and a
rerun of the command redoes only unfinished tasks.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Protocol

from lmforge.errors import ConfigError, TaskFailed
from lmforge.progress import progress_bar

log = logging.getLogger(__name__)

RAY_RETRIES = 3  # reruns of a task whose Ray worker died (killed, out of memory, node lost)


Count = Callable[[], int]  # what a stage has done so far (e.g. chunk files on disk), for its bar


class Executor(Protocol):
    slots: int  # tasks that run at once

    def map(self, fn: Callable[..., Any], jobs: Sequence[tuple], desc: str,
            count: tuple[str, Count] | None = None) -> list[Any]: ...

    def close(self) -> None: ...


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """While running, SIGTERM (what Slurm and Kubernetes send) stops the run as Ctrl-C does: the
    running tasks are stopped, the finished ones kept for a rerun."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be installed from the main thread
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def _worker_signals() -> None:
    """In a pool worker: Ctrl-C is for the driver (which stops the pool). SIGTERM — the driver
    stopping the pool after a failure or an interrupt — interrupts the running task, so the
    file it was writing is removed (``atomic_path``), not left half-written beside the
    finished ones."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _interrupt)


class _Bar:
    """A stage's progress: its finished tasks or, with ``count`` = (unit, function), what the
    function reports (polled while tasks run: a task may be long)."""

    POLL = 1.0  # seconds between polls

    def __init__(self, enabled: bool, desc: str, tasks: int, count: tuple[str, Count] | None
                 ) -> None:
        self.count = count[1] if count else None
        self.bar = progress_bar(enabled, desc=desc, total=None if count else tasks,
                                unit=count[0] if count else "task")

    def tasks_done(self, n: int) -> None:
        if self.count is None:
            self.bar.update(n)
        else:
            self.bar.update(self.count() - self.bar.n)

    def __enter__(self) -> _Bar:
        return self

    def __exit__(self, *error: Any) -> None:
        self.bar.close()


class LocalExecutor:
    """A pool of ``workers`` processes on this machine (forked where the platform can), a new
    one per stage; with one worker, tasks run in this process."""

    def __init__(self, workers: int, progress: bool) -> None:
        self.slots = workers or os.cpu_count() or 1
        self.progress = progress

    def map(self, fn: Callable[..., Any], jobs: Sequence[tuple], desc: str,
            count: tuple[str, Count] | None = None) -> list[Any]:
        with _Bar(self.progress, desc, len(jobs), count) as bar:
            if self.slots == 1 or len(jobs) <= 1:
                results = []
                for job in jobs:
                    results.append(fn(*job))
                    bar.tasks_done(1)
                return results
            method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
            pool = ProcessPoolExecutor(min(self.slots, len(jobs)), mp.get_context(method),
                                       initializer=_worker_signals)
            futures = [pool.submit(fn, *job) for job in jobs]
            try:
                pending = set(futures)
                while pending:
                    done, pending = wait(pending, _Bar.POLL, FIRST_COMPLETED)
                    for future in done:
                        future.result()  # the first failure stops the stage
                    bar.tasks_done(len(done))
            except BrokenProcessPool:
                raise TaskFailed(f"{desc}: a worker process died (killed, or out of memory); "
                                 "rerun the same command to resume") from None
            except BaseException:
                for process in mp.active_children():  # stop the tasks still running
                    process.terminate()
                raise
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
            return [future.result() for future in futures]

    def close(self) -> None:
        pass


class RayExecutor:
    """Ray tasks, one CPU each, on the cluster at ``address`` (else ``$RAY_ADDRESS``; else a
    local Ray started for the run with ``workers`` CPUs, or one per core)."""

    def __init__(self, address: str, workers: int, progress: bool) -> None:
        try:
            import ray
        except ImportError:
            raise ConfigError("executor: ray needs Ray (pip install 'lmforge[scale]')") from None
        self.ray, self.progress = ray, progress
        self.started = not ray.is_initialized()
        if self.started:
            address = address or os.environ.get("RAY_ADDRESS", "")
            local = {} if address else {"num_cpus": workers or os.cpu_count() or 1}
            ray.init(address=address or None, include_dashboard=False,
                     logging_level=logging.WARNING, **local)
        self.slots = max(1, int(ray.cluster_resources().get("CPU", 1)))
        log.info("ray: %d CPUs in the cluster", self.slots)

    def map(self, fn: Callable[..., Any], jobs: Sequence[tuple], desc: str,
            count: tuple[str, Count] | None = None) -> list[Any]:
        ray = self.ray
        remote = ray.remote(num_cpus=1, max_retries=RAY_RETRIES)(fn)
        refs = [remote.remote(*job) for job in jobs]
        with _Bar(self.progress, desc, len(jobs), count) as bar:
            try:
                pending = list(refs)
                while pending:
                    done, pending = ray.wait(pending, num_returns=1, timeout=_Bar.POLL)
                    ray.get(done)  # the first failure stops the stage
                    bar.tasks_done(len(done))
            except BaseException as e:
                # The stage's other tasks are left to finish (or to end with a local Ray's
                # shutdown): they only write whole files, and cancelling a task as it completes
                # can abort Ray's core ("Tried to complete task that was not pending").
                cause = getattr(e, "cause", None)
                if cause is not None:  # the task's own error, as the local executor raises it
                    raise cause from None
                if isinstance(e, ray.exceptions.RayError):  # a worker or node lost for good
                    raise TaskFailed(f"{desc}: {type(e).__name__} after {RAY_RETRIES} retries; "
                                     "rerun the same command to resume") from e
                raise
        return ray.get(refs)

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()


def make_executor(kind: str, ray_address: str, workers: int, progress: bool) -> Executor:
    if kind == "ray":
        return RayExecutor(ray_address, workers, progress)
    return LocalExecutor(workers, progress)
