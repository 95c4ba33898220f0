"""Multi-rank runs for the tests without torchrun's start-up: ranks forked from a pre-warmed fork server.

`run_ranks(nproc, module, args, ...)` runs `python -m module args` on `nproc` gloo ranks and returns what
`subprocess.run(torchrun ..., capture_output=True, text=True)` returned before: a CompletedProcess with the exit
code and the ranks' stdout and stderr. What it saves is start-up: torchrun imports torch (~3 s), then every rank
imports torch, DeepSpeed, Hydra and the project (~4-5 s of CPU each); on 2 cores a 2-rank run of a few tiny steps
spent ~10 s starting. Here one fork server per test session (multiprocessing's "forkserver", started on first
use) imports all that once (tests/distributed_preload.py) and each rank is a fork of it: ready in milliseconds.
OLMo-core and torchtitan test their distributed code the same way (N gloo processes on a free port).

Each rank, in the forked process, is set up as torchrun sets up its workers:
- its own session and process group (torchrun's `start_new_session`), so that stopping a rank stops its
  DataLoader workers too;
- fds 1 and 2 redirected to per-rank files (DeepSpeed and C++ code write to the fds, not to sys.stdout); the
  result's stdout/stderr are rank 0's followed by the others', unbuffered as with PYTHONUNBUFFERED=1;
- the environment the caller's subprocess would get (os.environ, PYTHONUNBUFFERED=1, OMP_NUM_THREADS=1, the
  caller's env) plus torchrun's RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_ADDR and a
  free MASTER_PORT; torch's thread count set from OMP_NUM_THREADS; torch's and numpy's global generators
  reseeded from the OS (a fresh process's are; forks would share the server's);
- cwd the repository, sys.path as `python -m` from there has it, sys.argv `[module, *args]`, then
  `runpy.run_module(module, run_name="__main__")`;
- it exits as the interpreter would: SystemExit's code (Hydra's, `sys.exit(2)` of a user error), 1 and the
  traceback for an uncaught exception, after joining non-daemon threads and running atexit handlers (W&B
  finishes its offline run there). A rank killed by a signal reports minus that signal.

The supervisor follows torchrun: the result is non-zero when any rank failed (the first failure's code: 2, 1,
-9, ...; torchrun itself would exit 1); after the first failure the other ranks get FAILURE_GRACE_S to stop on
their own (a gloo peer raises "Connection closed by peer" at once), then SIGTERM, then SIGKILL; a timeout kills
every rank and raises subprocess.TimeoutExpired as subprocess.run does. Like subprocess.run reading pipes to
their end, it returns only once no process (a rank's W&B service, say) still holds a rank's output.

The fork server is started with the repository first on sys.path and without the cwd entry (PYTHONSAFEPATH), so
it imports this checkout's code whatever the cwd of pytest and whichever checkout the editable install points
to; Python 3.11's forkserver ignores the parent's sys.path, and the ranks would otherwise run the modules the
server cached from elsewhere. Every rank checks this (the project's loaded modules come from this checkout) and
that the server held no thread when it forked (a forked thread pool deadlocks); either failing stops the rank
with an error naming it. What a forked rank cannot have: environment variables that a library reads only at
import (the server's, i.e. the pytest process's, apply). Tests that need those, or that test the launcher
itself, use torchrun (tests.support: `launcher="torchrun"`, start_distributed).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.forkserver
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path

from common.net import free_port

REPO = Path(__file__).resolve().parents[1]
PROJECT_PACKAGES = ("common", "data_prep", "pretrain", "launch", "tests")
PRELOAD = ("__main__", "tests.distributed_preload")  # __main__: pytest's script, when started as one
FAILURE_GRACE_S = 2.0
TERM_GRACE_S = 10.0
_server_lock = threading.Lock()


@dataclass(frozen=True)
class RankSpec:
    """What one rank process is told (pickled to it through the fork server)."""

    rank: int
    module: str
    args: tuple[str, ...]
    env: dict[str, str]
    stdout: str
    stderr: str


@dataclass
class _Failure:
    rank: int
    code: int


class _Timeout(Exception):
    pass


def run_ranks(
    nproc: int, module: str, args: Sequence[str], timeout: float, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`python -m module args` on `nproc` ranks forked from the warm server; see the module docstring."""
    context = _forkserver_context()
    command = ["run_ranks", f"--nproc={nproc}", "-m", module, *args]
    base_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    world = {"WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc), "GROUP_RANK": "0"}
    world.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    deadline = time.monotonic() + timeout
    with tempfile.TemporaryDirectory(prefix="run-ranks-") as logs:
        specs = [
            RankSpec(
                rank,
                module,
                tuple(args),
                {**base_env, **world, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                f"{logs}/rank{rank}.out",
                f"{logs}/rank{rank}.err",
            )
            for rank in range(nproc)
        ]
        processes = [context.Process(target=rank_main, args=(spec,), name=f"rank-{spec.rank}") for spec in specs]
        failure: _Failure | None = None
        try:
            for process in processes:
                process.start()
            failure = _supervise(processes, deadline)
            _wait_until_released([p for spec in specs for p in (spec.stdout, spec.stderr)], deadline)
        except _Timeout:
            _stop(processes, signal.SIGKILL)
            stdout, stderr = _collect(specs)
            raise subprocess.TimeoutExpired(command, timeout, output=stdout, stderr=stderr) from None
        finally:
            _stop(processes, signal.SIGKILL)  # only ranks still running: after an error in the supervisor itself
            for process in processes:
                if process.pid is not None:
                    process.join()
                    process.close()
        stdout, stderr = _collect(specs)
    if failure is not None:
        stderr += f"run_ranks: rank {failure.rank} failed first, exit code {failure.code}\n"
    return subprocess.CompletedProcess(command, failure.code if failure else 0, stdout, stderr)


def _forkserver_context() -> multiprocessing.context.ForkServerContext:
    context = multiprocessing.get_context("forkserver")
    with _server_lock:
        context.set_forkserver_preload(list(PRELOAD))
        # The server inherits the environment at start: the repository first on sys.path and no cwd entry (so it
        # imports this checkout's code), unbuffered stdio and one OpenMP/OpenBLAS thread (numpy starts a BLAS
        # thread pool at import otherwise, and the server must not hold threads when it forks).
        path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
        with _environment(PYTHONPATH=path, PYTHONSAFEPATH="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1"):
            multiprocessing.forkserver.ensure_running()
    return context  # type: ignore[return-value]


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _supervise(processes: Sequence[multiprocessing.process.BaseProcess], deadline: float) -> _Failure | None:
    """Wait for every rank; after the first failure stop the others as torchrun does. Returns that failure."""
    running: dict[int, tuple[int, multiprocessing.process.BaseProcess]] = {
        process.sentinel: (rank, process) for rank, process in enumerate(processes)
    }
    failure: _Failure | None = None
    escalate_at: float | None = None
    next_signal = signal.SIGTERM
    while running:
        now = time.monotonic()
        if now >= deadline:
            raise _Timeout
        wake = deadline if escalate_at is None else min(deadline, escalate_at)
        for sentinel in wait(list(running), timeout=max(0.0, wake - now)):
            rank, process = running.pop(sentinel)  # type: ignore[arg-type]
            process.join()
            code = process.exitcode
            assert code is not None
            if code != 0 and failure is None:
                failure = _Failure(rank, code)
                escalate_at = time.monotonic() + FAILURE_GRACE_S
        if escalate_at is not None and running and time.monotonic() >= escalate_at:
            _stop([process for _, process in running.values()], next_signal)
            escalate_at = time.monotonic() + TERM_GRACE_S if next_signal == signal.SIGTERM else None
            next_signal = signal.SIGKILL
    return failure


def _stop(processes: Sequence[multiprocessing.process.BaseProcess], sig: int) -> None:
    """Signal each running rank's process group (the rank and its DataLoader workers), and the rank itself in
    case it has not made its group yet."""
    for process in processes:
        pid = process.pid
        if pid is None or process.exitcode is not None:  # not started, or already ended
            continue
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _wait_until_released(paths: list[str], deadline: float) -> None:
    """Return once no process holds one of `paths` open: what reading a pipe to its end waits for."""
    while holders := _holders(set(paths)):
        if time.monotonic() >= deadline:
            for pid in holders:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            raise _Timeout
        time.sleep(0.05)


def _holders(paths: set[str]) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{entry}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{entry}/fd/{fd}") in paths:
                        found.append(int(entry))
                        break
    return found


def _collect(specs: list[RankSpec]) -> tuple[str, str]:
    """Rank 0's output first, then the others', as text (universal newlines, as subprocess's text mode)."""
    return "".join(_read(spec.stdout) for spec in specs), "".join(_read(spec.stderr) for spec in specs)


def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as file:
            return file.read()
    except FileNotFoundError:  # the rank never started
        return ""


# ----------------------------------------------------------------------------------------------------------------
# In the rank process (a fork of the server).


def rank_main(spec: RankSpec) -> None:
    """The rank process: set up as torchrun sets up a worker, run the module as `python -m`, exit as python does."""
    os.setsid()
    for fd, path in ((1, spec.stdout), (2, spec.stderr)):
        # O_APPEND: the rank's forked DataLoader workers share the file; their writes must not overwrite its own.
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(target, fd)
        os.close(target)
    os.environ.clear()
    os.environ.update(spec.env)
    os.chdir(REPO)
    preload = sys.modules.get("tests.distributed_preload")
    server_path = getattr(preload, "SYS_PATH", None) or [str(REPO), *(p for p in sys.path if p not in ("", str(REPO)))]
    sys.path[:] = server_path
    sys.argv = [spec.module, *spec.args]
    code = _run_as_main(spec.module)
    os._exit(code)


def _run_as_main(module: str) -> int:
    interrupted = False
    try:
        _check_server()
        _fresh_process_state()
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as stop:
        code = _exit_code(stop.code)
    except KeyboardInterrupt:
        sys.excepthook(*sys.exc_info())
        code, interrupted = 1, True
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    code = _interpreter_exit(code)
    if interrupted:  # Python dies of SIGINT after an uncaught KeyboardInterrupt
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    return code


def _exit_code(code: object) -> int:
    """As the interpreter maps SystemExit's code: None is 0, an int is itself, anything else is printed and 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _interpreter_exit(code: int) -> int:
    """What the interpreter does at exit before the process ends: join non-daemon threads, run atexit handlers,
    flush stdio. (multiprocessing would skip the handlers: its children end with os._exit.)"""
    import atexit

    current = threading.current_thread()
    for thread in threading.enumerate():
        if thread is not current and not thread.daemon:
            thread.join()
    try:
        atexit._run_exitfuncs()
    except SystemExit as stop:  # an exit handler may still change the exit code
        code = _exit_code(stop.code)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    return code


def _check_server() -> None:
    """The two things a fork server can get wrong: threads (forked pools deadlock) and stale modules."""
    tasks = os.listdir(f"/proc/{os.getppid()}/task")
    if len(tasks) > 1:
        names = []
        for task in tasks:
            with contextlib.suppress(OSError):
                names.append(Path(f"/proc/{os.getppid()}/task/{task}/comm").read_text().strip())
        raise RuntimeError(
            f"the fork server holds {len(tasks)} threads ({', '.join(names)}): a module it preloads started "
            "them; drop it from tests/distributed_preload.py MODULES"
        )
    stale = sorted(
        name
        for name, loaded in list(sys.modules.items())
        if name.split(".")[0] in PROJECT_PACKAGES
        and getattr(loaded, "__file__", None)
        and not Path(loaded.__file__).resolve().is_relative_to(REPO)  # type: ignore[arg-type]
    )
    if stale:
        raise RuntimeError(f"the fork server imported {', '.join(stale)} from outside {REPO}")


def _fresh_process_state() -> None:
    """What a freshly started rank has and a fork of the server would not: its own random seeds (Python's
    `random` reseeds itself at fork), and torch's thread count from its OMP_NUM_THREADS."""
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed()
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.seed()
        threads = os.environ.get("OMP_NUM_THREADS", "1")
        torch.set_num_threads(int(threads) if threads.isdigit() and int(threads) > 0 else 1)
