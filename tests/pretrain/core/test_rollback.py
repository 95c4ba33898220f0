"""Loss spikes on 2 real ranks: an automatic rollback to the last checkpoint, the data past it skipped, every
rollback logged (console, metrics.jsonl, W&B) and counted, a limit that stops the run, and a resume that
skips the same data."""

from __future__ import annotations

import math
from pathlib import Path

from data_prep.manifest import load_manifest
from pretrain.core.callbacks.metrics_file import read_metrics
from pretrain.core.callbacks.spikes import RollbackConfig
from pretrain.core.config import RunConfig, rollback_problems
from pretrain.core.data import GlobalOrder
from tests.pretrain.core.callbacks.test_tracking import history_rows, wandb_records
from tests.pretrain.core.test_trainer import traced_samples
from tests.support import complete_checkpoints, read_state, run_distributed, tiny_run_args

GLOBAL_BATCH = 8


def args(data: Path, run: Path, *extra: str) -> list[str]:
    return tiny_run_args(
        data,
        run,
        "eval.samples=16",
        "carbon.enabled=false",
        "checkpoint.interval=4",
        "train.trace_samples=true",
        "rollback.enabled=true",
        "rollback.window=3",
        "rollback.nonfinite_steps=2",
        "rollback.max_rollbacks=2",
        *extra,
    )


def test_spikes_roll_back_skip_their_data_and_the_limit_stops_the_run(tiny_dataset: Path, tmp_path: Path) -> None:
    # Bad batches (faults.py): those an uninterrupted run trains at steps 6 and 16 spike (loss x 1000), those
    # of steps 10 and 11 give NaN. Each one is trained earlier here, as each rollback skips data.
    env = {"PRETRAIN_FAULT": "spike_loss:6,16;nan_loss:10,11"}
    done = run_distributed(2, "pretrain", *args(tiny_dataset, tmp_path, "train.max_steps=30"), env=env, check=False)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    # 1. Step 6 spikes: back to step 4, the batches of steps 5 and 6 (positions 32-47) skipped.
    # 2. Steps 8 and 9 (the batches of 10 and 11) are not finite: back to step 8, one batch skipped (80-87).
    # 3. Step 13 (the batch of 16) spikes with the 2 rollbacks allowed spent: back to step 12, and stop.
    rollbacks = [e for e in read_metrics(tmp_path / "metrics.jsonl") if e["kind"] == "rollback"]
    assert [(e["step"], e["to_step"], e["skipped_samples"], e["rollbacks"]) for e in rollbacks] == [
        (6, 4, 16, 1),
        (9, 8, 8, 2),
        (13, 12, 8, 3),
    ]
    assert "above 2 x its mean over the last 3 steps" in rollbacks[0]["reason"] and rollbacks[0]["loss"] > 1000
    assert "2 non-finite losses in a row" in rollbacks[1]["reason"] and math.isnan(rollbacks[1]["loss"])
    lines = done.stdout.splitlines()
    assert sum(line.startswith("rollback ") for line in lines) == 3
    assert "rollback 1: step 6: loss" in done.stdout and "skipped 16 samples of the data order" in done.stdout
    assert (
        "after 2 rollback(s) (rollback.max_rollbacks=2): rolled back to the last checkpoint and stopped" in done.stdout
    )
    # The history reads as one run: the undone steps' lines are gone, the rollbacks stay.
    train = [e for e in read_metrics(tmp_path / "metrics.jsonl") if e["kind"] == "train"]
    assert [e["step"] for e in train] == list(range(1, 13))
    assert train[-1]["rollbacks"] == 2 and train[-1]["consumed_samples"] == 120
    # The latest checkpoint is the good step 12, and holds the skip of the rollback that stopped the run.
    assert complete_checkpoints(tmp_path)[-1].name == "step-00000012"
    state = read_state(complete_checkpoints(tmp_path)[-1])["trainer"]
    assert (state["step"], state["consumed_samples"], state["skipped_samples"], state["rollbacks"]) == (12, 128, 32, 3)
    # Every step trained the global order's next batch, the skipped windows aside.
    order = GlobalOrder(load_manifest(tiny_dataset).splits["train"].samples, seed=1234)
    starts = [0, 8, 16, 24, 48, 56, 64, 72, 88, 96, 104, 112]
    assert traced_samples(tmp_path) == {
        step: sorted(order(p) for p in range(start, start + GLOBAL_BATCH)) for step, start in enumerate(starts, 1)
    }
    # W&B: the rollback counter in the row of each step that spiked. Its history is at the trainer's step and only
    # grows: each step has one row, the first record of it (the steps a rollback trains again are not re-logged).
    (folder,) = (tmp_path / "wandb").glob("offline-run-*")
    (log,) = folder.glob("run-*.wandb")
    rows = history_rows(wandb_records(log))
    assert [row["_step"] for row in rows] == list(range(1, 14)), [row["_step"] for row in rows]
    assert all(row["step"] == row["_step"] for row in rows)
    logged = [row for row in rows if "rollback/to_step" in row]
    assert [(row["step"], row["rollbacks"], row["rollback/to_step"]) for row in logged] == [
        (6, 1, 4),
        (9, 2, 8),
        (13, 3, 12),
    ]

    # A later resume (the limit raised) continues after the recorded skip, at position 128.
    resumed = run_distributed(
        2, "pretrain", *args(tiny_dataset, tmp_path, "train.max_steps=14", "rollback.max_rollbacks=5"), env=env
    )
    assert "resumed from" in resumed.stdout and "at step 12 (128 samples consumed)" in resumed.stdout
    assert traced_samples(tmp_path)[13] == sorted(order(p) for p in range(128, 136))


def test_rollback_settings_are_checked_together() -> None:
    config = RunConfig()
    config.rollback = RollbackConfig(enabled=True, nonfinite_steps=5)
    config.checkpoint.interval = 0
    assert rollback_problems(config).messages == [
        "checkpoint.interval=0: must be > 0 with rollback.enabled=true: a rollback reloads the last periodic "
        "checkpoint",
        "rollback.nonfinite_steps=5: must be below train.max_nonfinite_steps (5), which stops the run first",
    ]
    assert RollbackConfig(loss_factor=1.0, window=0).problems().messages == [
        "rollback.loss_factor=1.0: must be > 1",
        "rollback.window=0: must be >= 1",
    ]
