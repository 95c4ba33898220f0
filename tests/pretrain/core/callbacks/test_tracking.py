"""W&B and CodeCarbon tracking on real 2-rank runs (torchrun, gloo): what a user finds in the run directory.

The offline W&B run is read back from its `.wandb` transaction log with wandb's own protobuf records
(library_internals.wandb_records, pinned in test_library_internals.py); the emissions from CodeCarbon's CSV,
metrics.jsonl and the checkpoints.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from pretrain.core.callbacks.carbon import CarbonConfig
from pretrain.core.callbacks.metrics_file import read_metrics
from pretrain.core.callbacks.wandb_run import WandbConfig
from pretrain.core.library_internals import wandb_records
from tests.support import complete_checkpoints, read_state, run_distributed, run_module, tiny_run_args

CARBON_METRICS = (
    "energy_kwh",
    "cpu_energy_kwh",
    "gpu_energy_kwh",
    "ram_energy_kwh",
    "emissions_kg_co2eq",
    "power_w",
    "kg_co2eq_per_million_tokens",
    "projected_kg_co2eq",
)


def train_args(data: Path, run: Path, *extra: str) -> list[str]:
    # The default learning rate (6e-4), as these runs have always used.
    return tiny_run_args(data, run, "train.lr=6e-4", "eval.samples=16", "checkpoint.interval=0", *extra)


def train_entries(run: Path) -> dict[int, dict[str, Any]]:
    return {e["step"]: e for e in read_metrics(run / "metrics.jsonl") if e["kind"] == "train"}


def history_rows(records: Any) -> list[dict[str, Any]]:
    return [
        {item.key or ".".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]


def summary_of(records: Any) -> dict[str, Any]:
    """The run's summary as the folder leaves it: every update applied in order."""
    summary: dict[str, Any] = {}
    for record in records:
        if record.WhichOneof("record_type") == "summary":
            summary.update(
                {item.key or ".".join(item.nested_key): json.loads(item.value_json) for item in record.summary.update}
            )
    return summary


def emissions_rows(run: Path) -> list[dict[str, str]]:
    with open(run / "emissions" / "node-0.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_tracked_run_resumes_the_same_wandb_run_and_carbon_totals(tiny_dataset: Path, tmp_path: Path) -> None:
    args = train_args(tiny_dataset, tmp_path, "train.max_steps=6")
    first = run_distributed(2, "pretrain", *args, "train.steps_per_run=3")
    assert "stopped at step 3" in first.stdout
    run_id = (tmp_path / "wandb" / "run_id").read_text().strip()
    after_first = read_state(complete_checkpoints(tmp_path)[-1])["callbacks"]
    assert after_first["wandb"] == {"id": run_id}
    resumed = run_distributed(2, "pretrain", *args)
    assert "resumed from" in resumed.stdout and "at step 3" in resumed.stdout
    final = read_state(complete_checkpoints(tmp_path)[-1])["callbacks"]
    assert final["wandb"] == {"id": run_id}

    # W&B: one offline folder per invocation, both holding the same run id, read back with wandb's records.
    folders = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert [f.name.rsplit("-", 1)[-1] for f in folders] == [run_id, run_id]
    logged = train_entries(tmp_path)
    rows: list[dict[str, Any]] = []
    summaries = []
    for folder in folders:
        records = list(wandb_records(folder / f"run-{run_id}.wandb"))
        runs = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        assert [r.run_id for r in runs] == [run_id] and runs[0].project == "gpt-pretrain"
        config = {
            item.key: json.loads(item.value_json)
            for r in records
            if r.WhichOneof("record_type") == "config"
            for item in r.config.update
        }
        assert config["train"]["max_steps"] == 6 and config["model"]["d_model"] == 64  # the resolved config
        assert config["world_size"] == 2
        metrics = {r.metric.glob_name: r.metric.step_metric for r in records if r.WhichOneof("record_type") == "metric"}
        assert metrics.get("*") == "step"  # every chart is against the training step
        rows += history_rows(records)
        summaries.append(summary_of(records))
    # W&B's own step is the trainer's, continuing across the resume: 1-3 in the first folder, 4-6 in the
    # second (not 0-3 twice, which the server would store over each other).
    assert [row["_step"] for row in rows] == [1, 2, 3, 4, 5, 6]
    assert all(row["_step"] == row["step"] for row in rows)
    train_rows = {row["step"]: row for row in rows if "loss" in row}
    assert sorted(train_rows) == [1, 2, 3, 4, 5, 6]  # the resumed invocation appended steps 4-6
    for step, row in train_rows.items():
        for key in ("loss", "tokens", "tokens_per_second", *CARBON_METRICS):
            assert math.isclose(row[key], logged[step][key], rel_tol=1e-12), (step, key)
    assert any("val_loss" in row and row["step"] == 6 for row in rows)  # the final evaluation, in step 6's row

    # Emissions: totals grow across the resume instead of restarting from zero.
    energies = [logged[step]["energy_kwh"] for step in range(1, 7)]
    emissions = [logged[step]["emissions_kg_co2eq"] for step in range(1, 7)]
    assert energies == sorted(energies) and emissions == sorted(emissions)
    assert energies[-1] > 0 and emissions[-1] > 0
    assert all(logged[step]["power_w"] > 0 for step in range(1, 7))  # every interval measured, none skipped
    assert logged[4]["energy_kwh"] > after_first["carbon"]["energy_kwh"]
    assert logged[6]["projected_kg_co2eq"] == logged[6]["emissions_kg_co2eq"]  # the planned run is done
    # Counted once per node: 2 ranks on one node ran one tracker (one CSV, one row per invocation), and the
    # run's total is exactly what that one tracker measured; a tracker per rank would double it.
    assert [p.name for p in (tmp_path / "emissions").iterdir()] == ["node-0.csv"]
    csv_rows = emissions_rows(tmp_path)
    assert len(csv_rows) == 2
    assert math.isclose(after_first["carbon"]["energy_kwh"], float(csv_rows[0]["energy_consumed"]), rel_tol=1e-9)
    for key, column in (("energy_kwh", "energy_consumed"), ("emissions_kg_co2eq", "emissions")):
        assert math.isclose(final["carbon"][key], sum(float(r[column]) for r in csv_rows), rel_tol=1e-9), key
    assert final["carbon"]["energy_kwh"] >= logged[6]["energy_kwh"]

    # The run's summary: how each invocation ended, the final validation loss, the run's total energy and
    # emissions (every invocation's CodeCarbon rows).
    assert summaries[0]["state"] == "stopped" and summaries[1]["state"] == "finished"
    final_eval = [e for e in read_metrics(tmp_path / "metrics.jsonl") if e["kind"] == "eval"][-1]
    assert summaries[1]["final_val_loss"] == final_eval["val_loss"]
    for key, column in (("total_energy_kwh", "energy_consumed"), ("total_kg_co2eq", "emissions")):
        assert math.isclose(summaries[1][key], sum(float(r[column]) for r in csv_rows), rel_tol=1e-9), key

    # The one command that uploads both folders, in order, each as a resume of the run (no server here: what
    # it would do).
    plan = run_module("pretrain.wandb_sync", str(tmp_path), "--dry-run", check=True).stdout.splitlines()
    assert plan[0] == f"W&B run {run_id}: 2 invocation(s), oldest first"
    assert plan[1].startswith(f"  {folders[0].name}: steps 1-3; ") and "state=stopped" in plan[1]
    assert plan[2].startswith(f"  {folders[1].name}: steps 4-6; ") and "state=finished" in plan[2]
    assert plan[3:] == [f"would run: WANDB_RESUME=allow wandb sync {folder}" for folder in folders]


def test_a_killed_invocations_rows_reach_wandb_once_and_in_order(tiny_dataset: Path, tmp_path: Path) -> None:
    """kill -9 loses what wandb-core had not written to the killed invocation's file; the resumed invocation
    logs it again from metrics.jsonl, up to its checkpoint, and then its own steps: every step once."""
    args = train_args(tiny_dataset, tmp_path, "train.max_steps=6", "checkpoint.interval=2", "carbon.enabled=false")
    # Real torchrun for the killed invocation: the fork-server runner waits on what the killed rank leaves
    # behind (its data-loader worker ignores stop signals) until its timeout.
    fault = {"PRETRAIN_FAULT": "kill_during_save:4"}
    killed = run_distributed(1, "pretrain", *args, env=fault, check=False, launcher="torchrun")
    assert killed.returncode != 0 and sorted(train_entries(tmp_path)) == [1, 2, 3, 4]
    resumed = run_distributed(1, "pretrain", *args)
    assert "at step 2" in resumed.stdout
    run_id = (tmp_path / "wandb" / "run_id").read_text().strip()
    folders = sorted((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(folders) == 2
    rows = [row for folder in folders for row in history_rows(wandb_records(folder / f"run-{run_id}.wandb"))]
    assert [row["_step"] for row in rows] == [1, 2, 3, 4, 5, 6]
    logged = train_entries(tmp_path)
    for row in rows:
        assert row["loss"] == logged[row["step"]]["loss"] and row["tokens"] == logged[row["step"]]["tokens"]


def test_carbon_budget_stops_the_run_with_a_checkpoint(tiny_dataset: Path, tmp_path: Path) -> None:
    args = train_args(tiny_dataset, tmp_path, "train.max_steps=200", "carbon.max_kg_co2eq=1e-9", "wandb.mode=disabled")
    stopped = run_distributed(2, "pretrain", *args)  # exit code 0, or run_distributed raises
    assert "carbon budget reached" in stopped.stdout and "projected" in stopped.stdout
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["state"] == "stopped" and "carbon.max_kg_co2eq=1e-09" in status["reason"]
    saved = complete_checkpoints(tmp_path)
    step = status["step"]
    assert [p.name for p in saved] == [f"step-{step:08d}"] and step < 200
    assert read_state(saved[-1])["callbacks"]["carbon"]["emissions_kg_co2eq"] >= 1e-9
    assert not (tmp_path / "wandb").exists()  # wandb.mode=disabled
    # The budget is part of the run's state: the same command stops again at once, with no step trained.
    again = run_distributed(2, "pretrain", *args)
    assert f"stopped at step {step}: carbon budget reached" in again.stdout
    assert max(train_entries(tmp_path)) == step
    assert len(emissions_rows(tmp_path)) == 1  # no tracker started for nothing


def test_tracking_switched_off_and_failing_trackers_never_stop_training(tiny_dataset: Path, tmp_path: Path) -> None:
    off = tmp_path / "off"
    run_distributed(
        2,
        "pretrain",
        *train_args(tiny_dataset, off, "train.max_steps=2", "wandb.mode=disabled", "carbon.enabled=false"),
    )
    assert not (off / "wandb").exists() and not (off / "emissions").exists()
    assert all("energy_kwh" not in e for e in train_entries(off).values()) and len(train_entries(off)) == 2
    assert read_state(complete_checkpoints(off)[-1])["callbacks"] == {"carbon": {}, "wandb": {}}

    # Real failures: the emissions folder's place is taken by a file, and W&B's dir is a file too.
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "emissions").write_text("not a folder")
    (broken / "not-a-dir").write_text("not a folder")
    done = run_distributed(
        2, "pretrain", *train_args(tiny_dataset, broken, "train.max_steps=3", f"wandb.dir={broken / 'not-a-dir'}")
    )
    lines = done.stdout.splitlines()
    carbon_warnings = [line for line in lines if line.startswith("warning: carbon tracking")]
    wandb_warnings = [line for line in lines if line.startswith("warning: W&B tracking")]
    assert len(carbon_warnings) == 1 and "FileExistsError" in carbon_warnings[0], done.stdout
    assert len(wandb_warnings) == 1 and "not-a-dir" in wandb_warnings[0], done.stdout
    assert "finished 3 steps" in done.stdout
    assert sorted(train_entries(broken)) == [1, 2, 3]


def test_config_problems_name_the_key() -> None:
    assert WandbConfig(mode="onlin").problems().messages == ["wandb.mode='onlin': must be online, offline or disabled"]
    assert WandbConfig(id="a/b").problems().messages[0].startswith("wandb.id='a/b'")
    messages = CarbonConfig(country_iso_code="XX", max_kg_co2eq=0.0, pue=0.5).problems().messages
    assert [m.split(":")[0] for m in messages] == [
        "carbon.country_iso_code='XX'",
        "carbon.max_kg_co2eq=0.0",
        "carbon.pue=0.5",
    ]
    assert CarbonConfig(enabled=False, country_iso_code="XX").problems().messages == []
    assert CarbonConfig(country_iso_code="FRA").problems().messages == []
