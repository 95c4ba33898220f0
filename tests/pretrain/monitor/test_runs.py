"""Following run directories while they are written (pretrain/monitor/runs.py, the readers of run_dir.py and
metrics_file.py): torn lines, rewritten files, half-written and older runs, an empty directory."""

from __future__ import annotations

import json
import os
from pathlib import Path

from common.files import append_line, write_text_atomic
from pretrain.core.callbacks.metrics_file import MetricsTail, read_metrics
from pretrain.core.run_dir import Outcome, ProcessInfo, RunDir, SweepPoint, read_emissions_csv
from pretrain.monitor.runs import Project

CSV_HEADER = (
    "timestamp,project_name,run_id,duration,emissions,cpu_energy,gpu_energy,ram_energy,energy_consumed,country_name"
)


def csv_row(invocation: str, kg: float, kwh: float) -> str:
    return f"2026-01-01T00:00:00,run,{invocation},10.0,{kg},{kwh / 2},0.0,{kwh / 2},{kwh},France"


def line(**entry: object) -> str:
    return json.dumps({"kind": "train", "time": 1.0, **entry}) + "\n"


def test_a_metrics_file_is_followed_line_by_line_and_read_again_when_replaced(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    tail = MetricsTail(path)
    assert tail.read() == (False, [])  # not there yet
    path.write_text(line(step=1) + line(step=2) + '{"kind": "train", "st')  # a line being written
    restarted, entries = tail.read()
    assert restarted and [e["step"] for e in entries] == [1, 2]
    assert read_metrics(path) == entries  # the whole-file reader agrees
    with open(path, "a") as handle:
        handle.write('ep": 3}\n' + line(step=4))
    assert tail.read() == (False, [{"kind": "train", "step": 3}, {"kind": "train", "time": 1.0, "step": 4}])
    assert tail.read() == (False, [])
    # A resume rewrites the file (atomically: another inode) without the steps past its checkpoint.
    write_text_atomic(path, line(step=1) + line(step=2))
    restarted, entries = tail.read()
    assert restarted and [e["step"] for e in entries] == [1, 2]


def test_an_emissions_csv_caught_mid_rewrite_keeps_its_last_intact_reading(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    run.emissions.mkdir(parents=True)
    run.config_file.write_text("train:\n  max_steps: 10\n")
    csv = run.emissions_csv(0)
    whole = f"{CSV_HEADER}\n{csv_row('a', 1e-3, 2e-3)}\n{csv_row('b', 2e-3, 4e-3)}\n"
    csv.write_text(whole)
    reading = read_emissions_csv(0, csv)
    assert reading.intact and len(reading.rows) == 2 and abs(reading.kg_co2eq - 3e-3) < 1e-15
    project = Project(tmp_path, stall_after_s=60)
    project.refresh(force=True)
    assert project.summary()["totals"]["kg_co2eq"] == reading.kg_co2eq
    # CodeCarbon rewrites the whole file at each reading; a reader can see it cut anywhere.
    for cut in (len(CSV_HEADER) + 30, len(whole) - 40, 10, 0):
        csv.write_text(whole[:cut])
        assert not read_emissions_csv(0, csv).intact or cut == 0
        os.utime(csv, ns=(cut + 1, cut + 1))  # another stat, so the monitor reads it again
        project.refresh(force=True)
        assert project.summary()["totals"]["kg_co2eq"] == reading.kg_co2eq, cut
    csv.write_text(whole + csv_row("c", 4e-3, 8e-3) + "\n")
    project.refresh(force=True)
    assert abs(project.summary()["totals"]["kg_co2eq"] - 7e-3) < 1e-15


def test_half_written_older_and_foreign_directories_show_as_such(tmp_path: Path) -> None:
    (tmp_path / "notes").mkdir()  # no run
    (tmp_path / "notes" / "readme.txt").write_text("not a run")
    only_config = RunDir(tmp_path / "starting")
    only_config.root.mkdir()
    only_config.config_file.write_text("train:\n  max_steps: 100\n")
    older = RunDir(tmp_path / "group" / "older")  # an older version: no config, no kind, no tokens, no process
    older.root.mkdir(parents=True)
    older.metrics.write_text('{"step": 1, "loss": 7.0}\n{"step": 2, "loss": 6.5}\nnot json at all\n')
    torn = RunDir(tmp_path / "torn")
    torn.root.mkdir()
    torn.config_file.write_text(": this is : not yaml [")
    torn.metrics.write_text(line(step=1, tokens=64, loss=7.0) + '{"kind": "train", "step": 2, "lo')
    torn.status_file.write_text('{"state": "fini')  # being written
    project = Project(tmp_path, stall_after_s=3600)
    project.refresh(force=True)
    summary = project.summary()
    runs = {r["name"]: r for r in summary["runs"]}
    assert sorted(runs) == ["group/older", "starting", "torn"]
    assert runs["starting"]["status"] == "starting" and runs["starting"]["max_steps"] == 100
    assert runs["group/older"]["step"] == 2 and runs["group/older"]["loss"] == 6.5
    assert "no config.yaml" in runs["group/older"]["problems"][0]
    assert runs["torn"]["step"] == 1 and runs["torn"]["status"] == "running"
    assert summary["totals"]["kg_co2eq"] == 0 and summary["totals"]["runs"] == 3
    # The page's increments: everything at first, then only what is new.
    series = project.series({})
    torn_id = runs["torn"]["id"]
    assert [e["step"] for e in series[torn_id]["entries"]] == [1] and series[torn_id]["reset"]
    with open(torn.metrics, "a") as handle:
        handle.write('ss": 6.9, "tokens": 128}\n')
    project.refresh(force=True)
    update = project.series({torn_id: (series[torn_id]["generation"], 1)})
    assert update[torn_id]["start"] == 1 and [e["step"] for e in update[torn_id]["entries"]] == [2]
    assert runs["group/older"]["id"] not in project.series({r["id"]: (0, 2) for r in summary["runs"]})


def test_an_empty_directory_has_no_runs_and_zero_totals(tmp_path: Path) -> None:
    project = Project(tmp_path, stall_after_s=60)
    project.refresh(force=True)
    summary = project.summary()
    assert summary["runs"] == [] and summary["sweeps"] == []
    assert summary["totals"]["kg_co2eq"] == 0 and summary["totals"]["runs"] == 0


def test_the_best_point_of_a_sweep(tmp_path: Path) -> None:
    for job, (lr, val_loss) in enumerate((("0.001", 6.5), ("0.003", 6.1), ("0.01", None))):
        run = RunDir(tmp_path / f"lr{lr}")
        run.write_sweep(SweepPoint("sweep-a", str(tmp_path), job, {"train.lr": lr}))
        entries = line(step=1, tokens=64, loss=7.0 - job)
        if val_loss is not None:
            entries += json.dumps({"kind": "eval", "step": 1, "tokens": 64, "val_loss": val_loss}) + "\n"
        run.metrics.write_text(entries)
    project = Project(tmp_path, stall_after_s=60)
    project.refresh(force=True)
    summary = project.summary()
    (sweep,) = summary["sweeps"]
    names = {r["id"]: r["name"] for r in summary["runs"]}
    assert [names[i] for i in sweep["runs"]] == ["lr0.001", "lr0.003", "lr0.01"]
    assert sweep["params"] == ["train.lr"] and names[sweep["best"]] == "lr0.003" and sweep["best_by"] == "val_loss"


def tree(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every file and folder under root: (inode, size, modification time in ns)."""
    out = {}
    for path in [root, *root.rglob("*")]:
        stat = path.stat()
        out[str(path.relative_to(root))] = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
    return out


def test_reading_changes_nothing_and_holds_nothing_open(tmp_path: Path) -> None:
    """What keeps the dashboard from ever blocking or slowing a run: it writes, renames and locks nothing, and
    holds no file open between refreshes, while the run appends and replaces its files as it trains."""
    import psutil

    run = RunDir(tmp_path / "sweep" / "lr0.1")
    run.root.mkdir(parents=True)
    run.config_file.write_text("train:\n  max_steps: 10\n")
    run.write_process(ProcessInfo.current())
    run.write_sweep(SweepPoint("sweep-a", str(tmp_path), 0, {"train.lr": "0.1"}))
    run.metrics.write_text(line(step=1, tokens=64, loss=7.0))
    run.emissions.mkdir()
    run.emissions_csv(0).write_text(f"{CSV_HEADER}\n{csv_row('a', 1e-3, 2e-3)}\n")
    project = Project(tmp_path, stall_after_s=60)
    for step in range(2, 6):
        before = tree(tmp_path)
        project.refresh(force=True)
        project.summary()
        project.series({})
        assert tree(tmp_path) == before, step
        assert not [f.path for f in psutil.Process().open_files() if f.path.startswith(str(tmp_path))]
        append_line(run.metrics, json.dumps({"kind": "train", "time": 1.0, "step": step, "tokens": 64 * step}))
    run.write_status(Outcome("finished"), 5, 10)
    project.refresh(force=True)
    (summary,) = project.summary()["runs"]
    assert (summary["status"], summary["step"], summary["sweep"]["params"]) == ("finished", 5, {"train.lr": "0.1"})


def test_a_resume_that_rewrites_the_metrics_file_resets_what_the_summary_kept(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    run.config_file.write_text("train:\n  max_steps: 10\n")

    def evaluation(step: int, val_loss: float) -> str:
        return json.dumps({"kind": "eval", "step": step, "val_loss": val_loss}) + "\n"

    run.metrics.write_text("".join(line(step=s, loss=7.0 - s) for s in (1, 2)) + evaluation(2, 6.0))
    project = Project(tmp_path, stall_after_s=3600)
    project.refresh(force=True)
    with open(run.metrics, "a") as handle:
        handle.write("".join(line(step=s, loss=7.0 - s) for s in (3, 4)) + evaluation(4, 5.0))
    project.refresh(force=True)
    (summary,) = project.summary()["runs"]
    assert (summary["step"], summary["loss"], summary["val_loss"], summary["best_val_loss"]) == (4, 3.0, 5.0, 5.0)
    # Killed after step 4, resumed from step 2's checkpoint: the trainer drops the entries past step 2.
    write_text_atomic(run.metrics, "".join(line(step=s, loss=7.0 - s) for s in (1, 2)) + evaluation(2, 6.0))
    project.refresh(force=True)
    (summary,) = project.summary()["runs"]
    assert (summary["step"], summary["loss"], summary["val_loss"], summary["best_val_loss"]) == (2, 5.0, 6.0, 6.0)
    assert project.series({summary["id"]: (0, 5)})[summary["id"]]["reset"]
