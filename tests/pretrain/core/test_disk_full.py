"""A full disk on a real size-limited file system (a small tmpfs; the tests run as root, and are skipped with the
reason where mounting is not permitted): during a checkpoint save the previous checkpoint stays the latest and
loadable, nothing half-written is committed, the run stops with one line (or goes on and saves at the next
interval, if so configured), and metrics.jsonl never ends in a torn line."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.files import append_line
from pretrain.core.callbacks.metrics_file import read_metrics
from tests.launch.runs import SMALL
from tests.support import REPO, complete_checkpoints


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "fs"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs ({done.stderr.strip() or done.returncode}): needs root (CAP_SYS_ADMIN)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def free(path: Path) -> int:
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def fill(fs: Path, leave: int) -> Path:
    """A file that takes all of the file system's free space but `leave` bytes."""
    filler = fs / "filler"
    with open(filler, "ab") as handle:
        handle.write(b"\0" * max(0, free(fs) - leave))
    return filler


def test_an_append_the_disk_refuses_leaves_no_torn_line(small_fs: Path) -> None:
    metrics = small_fs / "metrics.jsonl"
    append_line(metrics, json.dumps({"step": 1, "loss": 1.0}))
    before = metrics.read_bytes()
    fill(small_fs, leave=0)
    with pytest.raises(OSError):
        append_line(metrics, json.dumps({"step": 2, "loss": 0.5, "padding": "x" * 20000}))
    assert metrics.read_bytes() == before  # no part of the refused line is left
    (small_fs / "filler").unlink()
    append_line(metrics, json.dumps({"step": 2, "loss": 0.5}))
    assert [e["step"] for e in read_metrics(metrics)] == [1, 2]


def start(run: Path, data: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "launch", "launcher.nproc_per_node=2", "launcher.max_restarts=1"]
        + [f"data_dir={data}", f"run_dir={run}", *SMALL, "zero_stage=1", "train.max_steps=400"]
        + ["checkpoint.interval=2", "checkpoint.keep_last=10", *extra],
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for(what: str, ready, process: subprocess.Popen[str], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, f"the run ended before {what}: {process.stdout.read()[-4000:]}"  # type: ignore[union-attr]
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.05)


def size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint_and_stops_with_one_line(
    small_fs: Path, tiny_dataset: Path
) -> None:
    run = small_fs / "run"
    process = start(run, tiny_dataset)
    wait_for("a first checkpoint", lambda: bool(complete_checkpoints(run)), process)
    first = complete_checkpoints(run)[0]
    filler = fill(small_fs, leave=size(first) // 2)  # the next save runs out of space half-way
    output, _ = process.communicate(timeout=300)
    # Every rank took the same way out, through the status the launcher turns into exit code 2 (a user error:
    # freeing space is the fix). Under launcher.max_restarts the ranks exit 0, so torchrun did not retry it.
    assert process.returncode == 2, output[-4000:]
    assert "Worker group FAILED" not in output and "Traceback" not in output, output[-4000:]
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "failed" and status["user_error"] is True, status
    kept = complete_checkpoints(run)
    failed = f"step-{status['step']:08d}"
    reason = status["reason"]
    assert reason.startswith(f"checkpoint {failed} not saved: rank ") and "the file system is full" in reason, reason
    assert f"the latest checkpoint is still {kept[-1]}" in reason
    assert [line for line in output.splitlines() if "not saved" in line] == [
        f"stopped at step {status['step']}: {reason}; checkpoint {kept[-1]}; run the same command to resume"
    ]
    # Nothing of the failed save is left; `latest` names the last complete checkpoint, which stays loadable.
    assert not (run / "checkpoints" / failed).exists()
    assert (run / "checkpoints" / "latest").read_text().strip() == kept[-1].name
    steps = [e["step"] for e in read_metrics(run / "metrics.jsonl") if e["kind"] == "train"]
    assert steps == list(range(1, status["step"] + 1))  # every line whole

    # checkpoint.on_failure=continue: the same command resumes, its saves fail while the disk is full, with a
    # warning each, and training goes on; once there is room again the next interval saves.
    process = start(run, tiny_dataset, "checkpoint.on_failure=continue")
    lines: list[str] = []
    assert process.stdout is not None
    for line in process.stdout:
        lines.append(line)
        if line.startswith("warning: checkpoint step-") and "training goes on" in line:
            break
    assert f"at step {kept[-1].name.split('-')[1].lstrip('0')}" in "".join(lines), "".join(lines)[-3000:]
    filler.unlink()
    newest = kept[-1].name
    wait_for("a checkpoint after the disk was freed", lambda: complete_checkpoints(run)[-1].name > newest, process)
    process.send_signal(signal.SIGTERM)
    output = "".join(lines) + process.communicate(timeout=300)[0]
    assert process.returncode == 0, output[-4000:]
    assert json.loads((run / "status.json").read_text())["state"] == "stopped"
    # The steps run while no save worked were saved later: the history has no gap, the last checkpoint is complete.
    final = complete_checkpoints(run)[-1]
    steps = [e["step"] for e in read_metrics(run / "metrics.jsonl") if e["kind"] == "train"]
    assert steps == list(range(1, int(final.name.split("-")[1]) + 1))
    shutil.rmtree(run)
