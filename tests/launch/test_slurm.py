"""`python -m launch launcher=slurm` against a real one-node Slurm cluster (tests/launch/conftest.py): a run to
the end, a preemption that checkpoints, requeues and resumes exactly, a learning-rate sweep, the ranks' env."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from tests.launch.conftest import SlurmCluster
from tests.launch.runs import SMALL, assert_every_sample_once, assert_rank_environment, train_entries, train_steps
from tests.support import run_module


def submit(cluster: SlurmCluster, *args: str) -> list[str]:
    """Submit through the real command line; returns the job ids it printed."""
    flags = [arg for arg in args if arg.startswith("--")]  # Hydra's flags (--multirun) come before overrides
    overrides = [arg for arg in args if not arg.startswith("--")]
    done = run_module("launch", *flags, "launcher=slurm", *overrides, env=cluster.env, check=True)
    jobs = re.findall(r"^submitted job (\d+): log (\S+), run (\S+), script", done.stdout, flags=re.MULTILINE)
    assert jobs, done.stdout + done.stderr
    return [job for job, _log, _run in jobs]


def test_a_submitted_run_trains_to_the_end(slurm_cluster: SlurmCluster, tiny_dataset: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    (job,) = submit(
        slurm_cluster,
        "launcher.tasks_per_node=2",
        f"data_dir={tiny_dataset}",
        f"run_dir={run}",
        *SMALL,
        "train.max_steps=4",
    )
    ended = slurm_cluster.wait_until_done(job)
    log = (run / f"slurm-{job}.log").read_text()
    assert ended["JobState"] == "COMPLETED" and ended["ExitCode"] == "0:0" and ended["Restarts"] == "0", log
    assert train_steps(run) == [1, 2, 3, 4]
    assert {e["world_size"] for e in train_entries(run)} == {2}
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    assert "finished 4 steps" in log and "finished at step 4 of 4" in log  # the trainer's and the verdict's


def test_a_preempted_job_checkpoints_requeues_and_resumes_exactly(
    slurm_cluster: SlurmCluster, tiny_dataset: Path, tmp_path: Path
) -> None:
    run, steps = tmp_path / "run", 60
    args = [f"data_dir={tiny_dataset}", f"run_dir={run}", *SMALL, f"train.max_steps={steps}"]
    (job,) = submit(
        slurm_cluster, "launcher.tasks_per_node=2", *args, "train.trace_samples=true", "checkpoint.interval=0"
    )
    slurm_cluster.wait_for(job, "3 training steps", lambda _: len(train_steps(run)) >= 3, 240)
    # What Slurm does before a time limit (--signal=USR1@N): SIGUSR1 to every process of the job's steps.
    slurm_cluster.run("scancel", "--signal=USR1", job)
    # Right after the requeue the job is pending with no reason for a moment, until the controller sets the
    # begin time that holds a requeued job back.
    slurm_cluster.wait_for(
        job,
        "its requeue",
        lambda j: j["Restarts"] == "1" and j["JobState"] == "PENDING" and j["Reason"] == "BeginTime",
        120,
    )
    # Slurm holds a requeued job for a while (2 minutes here) before it may start again; the test releases it
    # sooner, once the node has cleaned the first run up and its revocation of that run's credential, which
    # has a one-second resolution, is in the past (else slurmd refuses the new start and the job fails).
    slurm_cluster.wait_for(job, "the node to be idle", lambda _: slurm_cluster.node_state() == "idle", 60)
    time.sleep(2)
    slurm_cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now")
    ended = slurm_cluster.wait_until_done(job)
    log = (run / f"slurm-{job}.log").read_text()
    assert ended["JobState"] == "COMPLETED" and ended["ExitCode"] == "0:0", log
    stopped = int(re.search(r"stopped at step (\d+): received SIGUSR1", log).group(1))  # type: ignore[union-attr]
    assert 3 <= stopped < steps
    assert f"at step {stopped}" in log and "requeueing" in log and f"finished {steps} steps" in log
    assert log.count("job " + job + ", restart") == 2  # one log for both invocations (append mode)
    # The full step count, each step once, and every sample of the global order exactly once.
    assert train_steps(run) == list(range(1, steps + 1))
    assert_every_sample_once(run, tiny_dataset, steps)


def test_a_learning_rate_sweep_submits_one_job_per_point(
    slurm_cluster: SlurmCluster, tiny_dataset: Path, tmp_path: Path
) -> None:
    jobs = submit(
        slurm_cluster,
        "--multirun",
        f"data_dir={tiny_dataset}",
        f"run_dir={tmp_path}/lr" + "${train.lr}",
        *SMALL,
        "train.max_steps=2",
        "train.lr=0.001,0.003",
    )
    assert len(jobs) == 2
    for job in jobs:
        assert slurm_cluster.wait_until_done(job)["JobState"] == "COMPLETED"
    for lr in ("0.001", "0.003"):
        run = tmp_path / f"lr{lr}"
        assert train_steps(run) == [1, 2]
        assert f"lr: {lr}" in (run / "config.yaml").read_text()


def test_the_ranks_see_the_same_environment_as_under_torchrun(
    slurm_cluster: SlurmCluster, tiny_dataset: Path, tmp_path: Path
) -> None:
    (job,) = submit(
        slurm_cluster,
        "launcher.tasks_per_node=2",
        "launch.module=tests.launch.rank_env",
        f"data_dir={tiny_dataset}",
        f"run_dir={tmp_path}",
        *SMALL,
    )
    slurm_cluster.wait_until_done(job)
    assert_rank_environment(tmp_path, nodes=1, per_node=2)
