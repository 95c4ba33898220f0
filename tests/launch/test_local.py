"""`python -m launch launcher=local`: torchrun and the DeepSpeed launcher on gloo ranks, two "machines" on
loopback meeting through the c10d rendezvous, and stop signals passed on to the ranks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.net import free_port
from tests.launch.runs import SMALL, assert_every_sample_once, assert_rank_environment, train_entries, train_steps
from tests.support import REPO, complete_checkpoints, kill_tree

ENV = {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def start_launch(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "launch", *args],
        cwd=REPO,
        env={**os.environ, **ENV},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(process: subprocess.Popen[str], timeout: float = 300) -> str:
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(process)  # type: ignore[arg-type]
        raise
    assert process.returncode == 0, output[-4000:]
    return output


def by_hand_on_two_nodes(program: str, *args: str) -> list[str]:
    """What a user types on each of two machines; here both "machines" are this one, on loopback."""
    port = free_port()
    nodes = [
        start_launch(
            f"launcher.program={program}",
            "launcher.nnodes=2",
            f"launcher.node_rank={rank}",
            "launcher.master_addr=127.0.0.1",
            f"launcher.master_port={port}",
            *args,
        )
        for rank in (1, 0)  # the node hosting the rendezvous may come last
    ]
    return [finish(node) for node in nodes]


@pytest.mark.parametrize("program", ["torchrun", "deepspeed"])
def test_every_launcher_gives_the_ranks_the_same_environment(program: str, tiny_dataset: Path, tmp_path: Path) -> None:
    # The Slurm path's ranks are checked the same way in test_slurm.py.
    args = ["launcher.nproc_per_node=2", "launch.module=tests.launch.rank_env"]
    finish(
        start_launch(f"launcher.program={program}", *args, f"data_dir={tiny_dataset}", f"run_dir={tmp_path}", *SMALL)
    )
    assert_rank_environment(tmp_path, nodes=1, per_node=2)


def test_two_nodes_on_loopback_train_together(tiny_dataset: Path, tmp_path: Path) -> None:
    outputs = by_hand_on_two_nodes(
        "torchrun",
        "launcher.nproc_per_node=1",
        f"data_dir={tiny_dataset}",
        f"run_dir={tmp_path}",
        *SMALL,
        "train.max_steps=3",
        "train.trace_samples=true",
    )
    assert "finished 3 steps" in "".join(outputs)
    assert train_steps(tmp_path) == [1, 2, 3]
    assert {e["world_size"] for e in train_entries(tmp_path)} == {2}
    assert sorted(p.name for p in tmp_path.glob("samples-rank*.jsonl")) == [
        "samples-rank0.jsonl",
        "samples-rank1.jsonl",
    ]
    assert_every_sample_once(tmp_path, tiny_dataset, 3)


def test_the_deepspeed_launcher_trains_on_two_cpu_ranks_and_checkpoints_on_sigusr1(
    tiny_dataset: Path, tmp_path: Path
) -> None:
    args = [
        "launcher.program=deepspeed",
        "launcher.nproc_per_node=2",
        f"data_dir={tiny_dataset}",
        f"run_dir={tmp_path}",
    ]
    args += [*SMALL, "checkpoint.interval=0"]
    process = start_launch(*args, "train.max_steps=400")
    deadline = time.monotonic() + 240
    while len(train_steps(tmp_path)) < 2:
        assert process.poll() is None, process.communicate()[0][-4000:]
        assert time.monotonic() < deadline, "no training step within 240 s"
        time.sleep(0.2)
    process.send_signal(signal.SIGUSR1)  # to the launcher, which passes it on to the ranks
    output = finish(process)
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["state"] == "stopped" and status["reason"] == "received SIGUSR1", output[-3000:]
    # The ranks checkpointed the step they were at; the same command resumes from there (test_slurm.py).
    assert [p.name for p in complete_checkpoints(tmp_path)] == [f"step-{status['step']:08d}"]
    assert train_steps(tmp_path) == list(range(1, status["step"] + 1))
    assert {e["world_size"] for e in train_entries(tmp_path)} == {2}
