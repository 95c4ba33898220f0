"""Two "machines" on loopback: two `python -m launch launcher.nnodes=2 launcher.node_rank=0|1 ...` commands, as a
user types them on two hosts, with every output line timestamped so that tests measure how fast a run notices
a fault and recovers from it."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from common.net import free_port
from tests.launch.runs import train_steps
from tests.support import REPO

ENV = {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


class Node:
    """One machine's launcher; `lines` holds (monotonic time, line) of everything it and its ranks printed."""

    def __init__(self, rank: int, args: list[str], env: dict[str, str], log: Path) -> None:
        self.rank, self.args, self.env, self.log = rank, args, env, log
        self.lines: list[tuple[float, str]] = []
        self.process: subprocess.Popen[str] | None = None
        self.start()

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "launch", *self.args],
            cwd=REPO,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # a test kills it (and everything under it) like a machine that dies
        )
        threading.Thread(target=self._pump, args=(self.process,), daemon=True).start()

    def _pump(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        with open(self.log, "a", encoding="utf-8") as log:
            for line in process.stdout:
                self.lines.append((time.monotonic(), line.rstrip("\n")))
                log.write(line)
                log.flush()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def family(self) -> list[psutil.Process]:
        """The launcher, torchrun, the ranks and their data loader workers."""
        assert self.process is not None
        try:
            parent = psutil.Process(self.process.pid)
            return [parent, *parent.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def ranks(self) -> list[psutil.Process]:
        """The training ranks (torchrun's children)."""
        ranks = []
        for process in self.family():
            with contextlib.suppress(psutil.Error):
                parent = process.parent()
                if parent is not None and "launch.torchrun" in parent.cmdline():
                    ranks.append(process)
        return ranks

    def agent(self) -> psutil.Process:
        """This node's torchrun agent (the launcher of its ranks)."""
        (agent,) = [p for p in self.family() if "launch.torchrun" in " ".join(p.cmdline())]
        return agent

    def kill(self) -> None:
        """kill -9 of the whole machine: launcher, torchrun, ranks, workers."""
        for process in self.family():
            with contextlib.suppress(psutil.NoSuchProcess):
                process.send_signal(signal.SIGKILL)
        if self.process is not None:
            self.process.wait()

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"node {self.rank} still running after {timeout} s:\n{self.tail()}") from None

    def first(self, pattern: str, after: float = 0.0) -> tuple[float, str] | None:
        """The first line matching `pattern` printed at or after `after` (monotonic time)."""
        regex = re.compile(pattern)
        return next(((t, line) for t, line in list(self.lines) if t >= after and regex.search(line)), None)

    def tail(self, lines: int = 60) -> str:
        return "\n".join(line for _, line in self.lines[-lines:])


class TwoNodes:
    def __init__(self, run: Path, args: list[str], env: dict[str, str] | None = None) -> None:
        self.run = run
        self.port = free_port()
        self.env = {**os.environ, **ENV, **(env or {})}
        self.nodes = [self._node(rank, args) for rank in (1, 0)][::-1]  # node 1 first: the host may come last

    def _node(self, rank: int, args: list[str]) -> Node:
        launcher = [
            "launcher.nnodes=2",
            f"launcher.node_rank={rank}",
            "launcher.master_addr=127.0.0.1",
            f"launcher.master_port={self.port}",
        ]
        return Node(rank, [*launcher, *args], self.env, self.run.parent / f"{self.run.name}-node{rank}.log")

    def __getitem__(self, rank: int) -> Node:
        return self.nodes[rank]

    # Bounds, not expectations: a loaded 2-core machine may take minutes to start a rank (torch, DeepSpeed).
    def wait_for(self, what: str, ready: Callable[[], bool], timeout: float = 900) -> float:
        deadline = time.monotonic() + timeout
        while not ready():
            if not any(node.running for node in self.nodes):
                raise AssertionError(f"both nodes ended while waiting for {what}:\n{self.tails()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} within {timeout} s:\n{self.tails()}")
            time.sleep(0.1)
        return time.monotonic()

    def wait_for_step(self, step: int, timeout: float = 900) -> float:
        return self.wait_for(f"step {step}", lambda: max(train_steps(self.run), default=0) >= step, timeout)

    def first(self, pattern: str, after: float = 0.0) -> tuple[float, str] | None:
        found = [hit for node in self.nodes if (hit := node.first(pattern, after))]
        return min(found) if found else None

    def wait_for_line(self, pattern: str, after: float, timeout: float = 900) -> tuple[float, str]:
        self.wait_for(f"a line matching {pattern!r}", lambda: self.first(pattern, after) is not None, timeout)
        found = self.first(pattern, after)
        assert found is not None
        return found

    def finish(self, timeout: float = 1800) -> None:
        for node in self.nodes:
            code = node.wait(timeout)
            assert code == 0, f"node {node.rank} exited {code}:\n{self.tails()}"

    def kill(self) -> None:
        for node in self.nodes:
            node.kill()

    def tails(self) -> str:
        return "\n".join(f"--- node {node.rank}:\n{node.tail()}" for node in self.nodes)
