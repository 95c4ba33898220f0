"""`python -m data_prep launcher=slurm` on a real one-node Slurm cluster (tests/slurm_cluster.py): job arrays of
scan and encode tasks, a plan job and a merge job; the dataset equals the one-task dataset byte for byte, and a
task killed mid-way is resumed by a rerun of the same command, from its last complete shard."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

from data_prep.workdir import task_slices
from tests.data_prep.conftest import SLICED_PREP
from tests.data_prep.test_tasks import assert_same_dataset
from tests.slurm_cluster import SlurmCluster
from tests.support import run_module

ON_SLURM = ("launcher=slurm", "launcher.cpus_per_task=1", "launcher.time=10", "tasks=3")
# The 5 slices of the sliced corpus in 3 tasks: slice 2 is encoded by task 1 (with slice 1).
STALLED_TASK = next(task for task in range(3) if 2 in task_slices(5, 3, task))


def submit(cluster: SlurmCluster, corpus: Path, out: Path, *extra: str, env: dict[str, str] | None = None):
    done = run_module(
        "data_prep",
        f"input=[{corpus}]",
        f"output_dir={out}",
        *SLICED_PREP,
        *ON_SLURM,
        *extra,
        env={**cluster.env, **(env or {})},
    )
    jobs = dict(re.findall(r"(scan|plan|encode|merge) job (\d+)", done.stdout))
    return done, jobs


def wait_for_merge(cluster: SlurmCluster, out: Path, job: str) -> dict[str, str]:
    ended = cluster.wait_until_done(job, timeout=400)
    logs = "".join(f"\n--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted((out / "slurm").glob("*.log")))
    assert ended["JobState"] == "COMPLETED", logs
    return ended


def test_three_array_tasks_give_the_one_task_dataset(
    slurm_cluster: SlurmCluster, sliced_corpus: Path, one_task_dataset: Path, tmp_path: Path
) -> None:
    out = tmp_path / "data"
    done, jobs = submit(slurm_cluster, sliced_corpus, out)
    assert done.returncode == 0, done.stderr
    assert list(jobs) == ["scan", "plan", "encode", "merge"], done.stdout
    assert "array tasks 0,1,2 of 3" in done.stdout
    wait_for_merge(slurm_cluster, out, jobs["merge"])
    assert_same_dataset(out, one_task_dataset)
    # The scripts and logs stay; the work directory is gone; a rerun has nothing to do.
    assert (out / "slurm" / "encode.sbatch").is_file() and list((out / "slurm").glob("encode-*_2.log"))
    again = run_module(
        "data_prep", f"input=[{sliced_corpus}]", f"output_dir={out}", *SLICED_PREP, *ON_SLURM, env=slurm_cluster.env
    )
    assert again.returncode == 0 and "up to date" in again.stdout


def test_a_task_killed_mid_way_is_resumed_by_a_rerun(
    slurm_cluster: SlurmCluster, sliced_corpus: Path, one_task_dataset: Path, tmp_path: Path
) -> None:
    out = tmp_path / "data"
    # Slice 2 (the third book) stalls after 2 complete shards.
    done, jobs = submit(slurm_cluster, sliced_corpus, out, env={"DATA_PREP_FAULT": "stall_after_shards:2:2"})
    assert done.returncode == 0, done.stderr
    checkpoint = out / ".data_prep" / "slices" / "000002" / "checkpoint.json"
    deadline = time.monotonic() + 300
    while not (checkpoint.is_file() and _shards(checkpoint) >= 2):
        assert time.monotonic() < deadline, f"slice 2 made no 2 shards in 300 s{slurm_cluster.logs()}"
        time.sleep(0.5)
    # While the jobs are queued or running, the same command is refused rather than submitting twice.
    busy = run_module(
        "data_prep", f"input=[{sliced_corpus}]", f"output_dir={out}", *SLICED_PREP, *ON_SLURM, env=slurm_cluster.env
    )
    assert busy.returncode == 2 and "still queued or running" in busy.stderr, busy.stderr
    # Kill the task mid-way (SIGKILL: nothing gets to clean up); the merge, which depended on it, is cancelled.
    slurm_cluster.run("scancel", "--signal=KILL", f"{jobs['encode']}_{STALLED_TASK}")
    merge = slurm_cluster.wait_until_done(jobs["merge"], timeout=200)
    assert merge["JobState"] == "CANCELLED", merge
    _wait_until_idle(slurm_cluster, list(jobs.values()))
    assert not (out / "manifest.json").exists()
    assert not (out / ".data_prep" / "slices" / "000002" / "done.json").exists()

    rerun, again = submit(slurm_cluster, sliced_corpus, out)
    assert rerun.returncode == 0, rerun.stderr
    # Only what is missing: the killed array task and the merge.
    assert list(again) == ["encode", "merge"] and f"array tasks {STALLED_TASK} of 3" in rerun.stdout, rerun.stdout
    wait_for_merge(slurm_cluster, out, again["merge"])
    log = next((out / "slurm").glob(f"encode-{again['encode']}_{STALLED_TASK}.log")).read_text()
    assert re.search(r"slice 2: resuming after 2 complete shards", log), log
    assert_same_dataset(out, one_task_dataset)


def test_dry_run_prints_the_job_scripts(sliced_corpus: Path, tmp_path: Path) -> None:
    done = run_module(
        "data_prep",
        f"input=[{sliced_corpus}]",
        f"output_dir={tmp_path / 'data'}",
        *SLICED_PREP,
        *ON_SLURM,
        "launcher.dry_run=true",
        "launcher.partition=cpu",
        "launcher.account=lab",
        "launcher.mem=4G",
        "launcher.tokenizer_mem=32G",
        "launcher.max_running=2",
        "launcher.setup=[source /opt/env.sh]",
        check=True,
    )
    out = done.stdout
    assert "# sbatch --array=0,1,2%2 " in out and "--dependency=afterok:<scan job> --kill-on-invalid-dep=yes" in out
    assert out.count("#SBATCH --partition=cpu") == 4 and out.count("#SBATCH --account=lab") == 4
    assert out.count("#SBATCH --mem=4G") == 3 and out.count("#SBATCH --mem=32G") == 1  # the plan trains
    assert "#SBATCH --cpus-per-task=1" in out and "source /opt/env.sh" in out
    assert re.search(r"-m data_prep\.task \S+ encode --task=\$SLURM_ARRAY_TASK_ID --tasks=3", out)
    assert "submitted" not in out


def _shards(checkpoint: Path) -> int:
    try:
        state = json.loads(checkpoint.read_text())
    except (OSError, ValueError):
        return 0
    return sum(len(split["shards"]) for split in state.values() if split)


def _wait_until_idle(cluster: SlurmCluster, jobs: list[str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        listed = subprocess.run(
            ["squeue", "--noheader", f"--jobs={','.join(jobs)}"], env=cluster.env, capture_output=True, text=True
        ).stdout.strip()
        if not listed:
            return
        assert time.monotonic() < deadline, f"jobs still listed: {listed}"
        time.sleep(0.5)


def test_slurm_keys_that_become_job_script_lines_are_checked() -> None:
    from data_prep.config import SlurmLauncherConfig

    config = SlurmLauncherConfig(
        partition="gpu a", mem="", time="soon", extra_sbatch=["exclusive"], setup=["source a\nsource b"]
    )
    messages = " | ".join(config.problems().messages)
    assert "launcher.partition" in messages and "launcher.mem" in messages and "one word" in messages
    assert "launcher.time" in messages and "launcher.extra_sbatch" in messages and "launcher.setup" in messages
    assert (
        not SlurmLauncherConfig(partition="gpu", mem="16G", time="1:00:00", extra_sbatch=["--exclusive"])
        .problems()
        .messages
    )
