"""The launcher's config: composition, the sbatch script it writes, validation before anything starts, and
the requeue verdict. No cluster needed: `launch.dry_run=true` prints what would be submitted."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from launch.config import LaunchConfig, register_configs, slurm_time_seconds, training_overrides
from launch.status import decide
from pretrain.core.config import RunConfig
from pretrain.core.run_dir import RunDir
from tests.support import REPO, run_module

TRAINING = ["experiment=demo", "model.n_layer=2", "train.lr=1e-3", "run_dir=runs/x", "checkpoint.interval=7"]


def _compose(name: str, overrides: list[str]):
    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        return OmegaConf.to_object(compose(name, overrides=overrides))


@pytest.mark.parametrize("launcher", ["local", "slurm"])
def test_the_launcher_validates_the_run_the_ranks_will_compose(launcher: str) -> None:
    """conf/launch.yaml repeats conf/train.yaml's defaults: both must give the same run for the same overrides."""
    launched = _compose("launch", [f"launcher={launcher}", *TRAINING])
    trained = _compose("train", TRAINING)
    assert isinstance(launched, LaunchConfig) and isinstance(trained, RunConfig)
    assert launched.run_config() == trained
    assert launched.zero_stage == 1 and launched.train.lr == 1e-3  # the experiment and the override applied


def test_only_the_training_overrides_reach_the_ranks() -> None:
    given = [
        "launcher=slurm",
        "launcher.nodes=2",
        "+launcher.x=1",
        "launch.dry_run=true",
        "train.lr=1e-3",
        "model=tiny",
    ]
    assert training_overrides(given) == ["train.lr=1e-3", "model=tiny"]


def test_slurm_time_limits() -> None:
    assert slurm_time_seconds("30") == 1800
    assert slurm_time_seconds("30:15") == 1815
    assert slurm_time_seconds("4:00:00") == 4 * 3600
    assert slurm_time_seconds("2-12") == 60 * 3600
    assert slurm_time_seconds("1-00:30:00") == 24 * 3600 + 1800
    assert slurm_time_seconds("1h") is None


def _sbatch_options(script: str) -> dict[str, str]:
    options = {}
    for line in script.splitlines():
        if line.startswith("#SBATCH "):
            option = line.removeprefix("#SBATCH ").split("  #")[0]
            key, _, value = option.partition("=")
            options[key] = value
    return options


def test_sbatch_script_for_4_nodes_of_8_gpus_follows_the_config(tiny_dataset: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    training = [f"data_dir={tiny_dataset}", f"run_dir={run}", "model=tiny", "train.micro_batch_size=2"]
    training += ["train.global_batch_size=64", "train.lr=3e-4", "zero_stage=2"]
    done = run_module(
        "launch",
        "launcher=slurm",
        "launcher.nodes=4",
        "launcher.tasks_per_node=8",
        "launcher.gpus_per_node=8",
        "launcher.cpus_per_task=12",
        "launcher.mem=480G",
        "launcher.time=2-00:00:00",
        "launcher.partition=gpu",
        "launcher.account=proj42",
        "launcher.qos=high",
        "launcher.constraint=h100",
        "launcher.job_name=gpt-4x8",
        f"launcher.output={tmp_path}/logs/%x-%j.out",
        "launcher.signal_lead_s=600",
        "launcher.extra_sbatch=['--exclusive','--mail-type=END']",
        "launcher.setup=['module load cuda/12.4','export NCCL_DEBUG=WARN']",
        "launcher.rdzv_port=29400",
        *training,
        "launch.dry_run=true",
        check=True,
    )
    script = done.stdout
    options = _sbatch_options(script)
    assert options == {
        "--job-name": "gpt-4x8",
        "--nodes": "4",
        "--ntasks-per-node": "1",  # one torchrun per node ...
        "--cpus-per-task": "96",  # ... with the CPUs of its 8 ranks
        "--gpus-per-node": "8",
        "--mem": "480G",
        "--time": "2-00:00:00",
        "--partition": "gpu",
        "--account": "proj42",
        "--qos": "high",
        "--constraint": "h100",
        "--output": f"{tmp_path}/logs/%x-%j.out",
        "--open-mode": "append",
        "--signal": "USR1@600",
        "--requeue": "",
        "--chdir": str(REPO),
        "--exclusive": "",
        "--mail-type": "END",
    }
    # The environment setup runs before training; srun starts torchrun on every node, 8 ranks each.
    assert script.index("module load cuda/12.4\nexport NCCL_DEBUG=WARN") < script.index("srun ")
    command = shlex.split(script[script.index("srun ") : script.index(" &\n")].replace("\\\n", " "))
    assert command[:4] == ["srun", "--ntasks-per-node=1", "--cpus-per-task=96", "--kill-on-bad-exit=1"]
    for flag in (
        "--nnodes=4",
        "--nproc_per_node=8",
        "--rdzv_backend=c10d",
        "--rdzv_endpoint=$head_node:$rdzv_port",
        "--rdzv_id=$SLURM_JOB_ID",
        "--shutdown_timeout=600",
    ):
        assert flag in command, flag
    assert "SIGUSR1" in next(word for word in command if word.startswith("--signals_to_handle="))
    module = command.index("-m", command.index("--max_restarts=0"))
    assert command[module : module + 2] == ["-m", "pretrain"]
    assert command[module + 2 :] == training  # the ranks compose the validated run from the same overrides
    assert "scontrol requeue" in script and "--max-requeues 100" in script
    assert "\nrdzv_port=29400\n" in script
    assert 'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in script
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)  # valid shell
    assert not run.exists()  # a dry run creates nothing


def test_problems_are_reported_at_once_before_anything_is_submitted(tiny_dataset: Path, tmp_path: Path) -> None:
    done = run_module(
        "launch",
        "launcher=slurm",
        "launcher.nodes=3",
        "launcher.tasks_per_node=8",
        "launcher.gpus_per_node=4",
        "launcher.time=5",
        "launcher.signal_lead_s=600",
        "parallel.pipeline_stages=5",
        "model=tiny",
        "train.micro_batch_size=2",
        "train.global_batch_size=60",
        f"data_dir={tiny_dataset}",
        f"run_dir={tmp_path / 'run'}",
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: invalid config: "), done.stderr
    for fragment in (
        "launcher.tasks_per_node=8: must equal launcher.gpus_per_node (4)",
        "launcher.time='5': must exceed launcher.signal_lead_s (600 s)",
        "parallel.pipeline_stages=5: must divide the world size (24)",
        "train.global_batch_size=60: must be a multiple of",
    ):
        assert fragment in lines[0], fragment
    assert not (tmp_path / "run").exists()

    local = run_module(
        "launch", "launcher.nnodes=2", "launcher.node_rank=2", f"data_dir={tmp_path / 'nowhere'}", "launch.dry_run=true"
    )
    assert local.returncode == 2
    assert re.fullmatch(
        r"error: invalid config: launcher.node_rank=2: must be in \[0, launcher.nnodes=2\); launcher.master_port=0: "
        r"must name node 0's port .*; data_dir=.*holds no manifest.json: run python -m data_prep first\n",
        local.stderr,
    ), local.stderr


def _status(run: Path, state: str, reason: str | None, requeue: bool = False) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    status = {"state": state, "step": 3, "max_steps": 9, "reason": reason, "requeue": requeue}
    (run / "status.json").write_text(json.dumps(status))
    return run


def test_what_requeues(tmp_path: Path) -> None:
    assert decide(_status(tmp_path, "stopped", "received SIGUSR1", True), 0, 100).action == "requeue"
    assert decide(_status(tmp_path, "stopped", "train.steps_per_run=3 steps done", True), 5, 100).action == "requeue"
    assert decide(_status(tmp_path, "stopped", "received SIGUSR1", True), 100, 100).action == "stopped"  # budget spent
    assert decide(_status(tmp_path, "stopped", "received SIGTERM"), 0, 100).action == "stopped"  # scancel
    assert decide(_status(tmp_path, "finished", None), 0, 100).action == "finished"
    assert decide(_status(tmp_path, "failed", "5 non-finite losses"), 0, 100).action == "failed"
    assert decide(tmp_path / "nothing", 0, 100).action == "failed"


def test_a_run_that_ended_without_a_verdict_requeues_until_failures_repeat(tmp_path: Path) -> None:
    """A node died (no status.json): requeued like a preemption, but not more than `requeue_failures` times in a
    row without a new checkpoint in between, nor past the requeue budget."""
    run = RunDir(tmp_path)

    def checkpoint(step: int) -> None:
        made = run.checkpoint(step)
        made.path.mkdir(parents=True)
        made.state_file.write_text("{}")
        made.complete_marker.write_text(f"{made.tag}\n")

    assert [decide(tmp_path, 0, 100, requeue_failures=2).action for _ in range(3)] == ["requeue", "requeue", "failed"]
    checkpoint(4)  # progress since: the count starts again
    verdict = decide(tmp_path, 0, 100, requeue_failures=2)
    assert verdict.action == "requeue" and "resume from step-00000004 (failure 1 of 2 in a row)" in verdict.why
    assert decide(tmp_path, 100, 100, requeue_failures=2).action == "failed"  # the requeue budget is spent
    assert decide(tmp_path, 0, 100).action == "failed"  # launcher.requeue_failures=0: a failure ends the job
    # The ranks exited 0 without a status: not the trainer (launch.module), nothing to resume or retry.
    done = decide(tmp_path, 0, 100, requeue_failures=2, exit_code=0)
    assert done.action == "finished" and "exited 0" in done.why
    assert decide(tmp_path, 0, 100, requeue_failures=9, exit_code=1).action == "requeue"  # a dead node: srun fails
