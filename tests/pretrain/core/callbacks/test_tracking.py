"""W&B and CodeCarbon tracking on real 2-rank runs (torchrun, gloo): what a user finds in the run directory.

The offline W&B run is read back from its `.wandb` transaction log with wandb's own protobuf records; the
emissions from CodeCarbon's CSV, metrics.jsonl and the checkpoints.
"""

from __future__ import annotations

import csv
import json
import math
import struct
import zlib
from pathlib import Path
from typing import Any

from pretrain.core.callbacks.carbon import CarbonConfig
from pretrain.core.callbacks.metrics_file import read_metrics
from pretrain.core.callbacks.wandb_run import WandbConfig
from tests.support import complete_checkpoints, read_state, run_distributed, tiny_run_args

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


def wandb_records(path: Path) -> list[Any]:
    """Every record of a `.wandb` file, as wandb's own `Record` protobufs.

    wandb 0.31 has no Python reader left (wandb-core writes the file); the framing is the LevelDB log format
    its datastore always used: a 7-byte header (":W&B", magic 0xBEE1, version), then 32 KiB blocks of chunks,
    each with crc32, length and type (full, first, middle, last).
    """
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1), (ident, magic)
    records, pending, position = [], b"", 7
    while position + 7 <= len(data):
        left_in_block = 32768 - position % 32768
        if left_in_block < 7:  # a block's tail too short for a chunk header is padding
            position += left_in_block
            continue
        checksum, length, kind = struct.unpack("<IHB", data[position : position + 7])
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == checksum, f"corrupt chunk in {path}"
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def history_rows(records: list[Any]) -> list[dict[str, Any]]:
    return [
        {item.key or ".".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]


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
    for folder in folders:
        records = wandb_records(folder / f"run-{run_id}.wandb")
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
    train_rows = {row["step"]: row for row in rows if "loss" in row}
    assert sorted(train_rows) == [1, 2, 3, 4, 5, 6]  # the resumed invocation appended steps 4-6
    for step, row in train_rows.items():
        for key in ("loss", "tokens", "tokens_per_second", *CARBON_METRICS):
            assert math.isclose(row[key], logged[step][key], rel_tol=1e-12), (step, key)
    assert any("val_loss" in row and row["step"] == 6 for row in rows)

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
