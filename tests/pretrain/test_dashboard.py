"""`python -m pretrain.dashboard` on real runs, in a real headless Chromium: two runs (one preempted and
waiting to resume, one that trains while the page watches it, then is killed with kill -9) and a two-point
sweep started by `python -m launch -m`.

The runs start together (module fixture) and the tests read them in order: what the page lists, the live
chart growing without a reload, the killed run, the project's CO2 against every emissions CSV, a screenshot,
the exported file, bad input.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pretrain.core.library_internals import wandb_records
from pretrain.core.run_dir import RunDir
from tests.chromium import Chromium
from tests.support import REPO, kill_tree, run_module, tiny_run_args, torchrun_command

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
RUNS = {"preempted": "preempted", "sweep/lr0.001": "finished", "sweep/lr0.003": "finished"}


def start(command: list[str], log: Path, nice: int = 0) -> subprocess.Popen[str]:
    """Start a command in its own session, its output into `log` (a pipe nobody reads would fill and block it)."""
    with open(log, "w") as handle:
        return subprocess.Popen(
            command,
            cwd=REPO,
            env=ENV,
            stdout=handle,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
            preexec_fn=(lambda: os.nice(nice)) if nice else None,
        )


def train(data: Path, run: Path, log: Path, *extra: str, nice: int = 0) -> subprocess.Popen[str]:
    args = tiny_run_args(data, run, "eval.samples=8", "checkpoint.interval=0", "wandb.mode=disabled", *extra)
    return start(torchrun_command(1, "pretrain", *args), log, nice)


def finish(process: subprocess.Popen[str], log: Path, timeout: float = 600) -> None:
    process.wait(timeout=timeout)
    assert process.returncode == 0, f"{log.stem} exited {process.returncode}:\n{log.read_text()[-4000:]}"


@pytest.fixture(scope="module")
def project(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("dashboard")
    runs, logs = root / "runs", root / "logs"
    runs.mkdir()
    logs.mkdir()
    processes: dict[str, subprocess.Popen[str]] = {}
    browser = None
    try:
        # Stops after 2 of 6 steps asking to be started again, as a Slurm preemption (SIGUSR1) does.
        processes["preempted"] = train(
            tiny_dataset, runs / "preempted", logs / "preempted.log", "train.max_steps=6", "train.steps_per_run=2"
        )
        # W&B on (offline): the two points must share a group, the sweep's.
        processes["sweep"] = start(
            [
                sys.executable,
                "-m",
                "launch",
                "-m",
                "launcher.nproc_per_node=1",
                *tiny_run_args(tiny_dataset, runs / "sweep" / "lr${train.lr}", "eval.samples=8"),
                "checkpoint.interval=0",
                "train.max_steps=3",
                "eval.interval=3",
                "train.lr=0.001,0.003",
                f"hydra.sweep.dir={root}/multirun/the-sweep",
            ],
            logs / "sweep.log",
        )
        # Trains until killed; nice, so that the runs that must end get the CPU first.
        processes["live"] = train(tiny_dataset, runs / "live", logs / "live.log", "train.max_steps=100000", nice=10)
        server_log = logs / "dashboard.log"
        processes["server"] = start(
            [sys.executable, "-m", "pretrain.dashboard", f"runs_dir={runs}", "port=0", "refresh_s=0.5"], server_log
        )
        deadline = time.monotonic() + 120
        while not (found := re.search(r"at (http://127\.0\.0\.1:\d+/) \(Ctrl-C", server_log.read_text())):
            assert processes["server"].poll() is None and time.monotonic() < deadline, server_log.read_text()
            time.sleep(0.2)
        browser = Chromium(root / "chromium-profile")
        yield {
            "root": root,
            "runs": runs,
            "logs": logs,
            "processes": processes,
            "url": found.group(1),
            "browser": browser,
        }
    finally:
        if browser is not None:
            browser.close()
        for process in processes.values():
            if process.poll() is None:
                kill_tree(process)  # type: ignore[arg-type]


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def statuses(browser: Chromium) -> dict[str, str]:
    return browser.evaluate(
        "dashboard.state.summary ? Object.fromEntries(dashboard.state.summary.runs.map(r => [r.name, r.status])) : {}"
    )


def csv_totals(runs: Path) -> tuple[float, float, int]:
    """(kWh, kg CO2eq, rows) summed over every row of every emissions CSV under `runs`, read independently."""
    kwh = kg = 0.0
    rows = 0
    for path in runs.rglob("emissions/node-*.csv"):
        with open(path, newline="") as handle:
            for row in csv.DictReader(handle):
                kwh, kg, rows = kwh + float(row["energy_consumed"]), kg + float(row["emissions"]), rows + 1
    return kwh, kg, rows


def test_the_page_lists_the_runs_and_the_sweep_grouped(project: dict[str, Any]) -> None:
    processes, runs, browser = project["processes"], project["runs"], project["browser"]
    for name in ("preempted", "sweep"):
        finish(processes[name], project["logs"] / f"{name}.log")
    browser.open(project["url"])
    browser.wait_for(
        f"(() => {{ const s = {json.dumps(RUNS)}; const now = Object.fromEntries((dashboard.state.summary || "
        "{runs: []}).runs.map(r => [r.name, r.status])); return Object.keys(s).every(k => now[k] === s[k]) "
        "&& now.live === 'running'; })()",
        timeout=300,
        what="every run with its status",
    )
    assert statuses(browser) == {**RUNS, "live": "running"}
    rows = browser.evaluate("[...document.querySelectorAll('tr.run')].map(r => [r.dataset.name, r.dataset.status])")
    assert sorted(map(tuple, rows)) == sorted({**RUNS, "live": "running"}.items())
    group = browser.evaluate("document.querySelector('tr.group').textContent")
    assert "2 points over train.lr" in group and "best" in group, group
    assert browser.evaluate("document.querySelectorAll('tr.run.best').length") == 1

    summary = get_json(project["url"] + "api/summary")
    by_name = {run["name"]: run for run in summary["runs"]}
    point = by_name["sweep/lr0.001"]
    assert (point["step"], point["max_steps"], point["tokens"]) == (3, 3, 3 * 8 * 64)
    assert point["best_val_loss"] is not None and point["loss"] is not None
    assert (by_name["preempted"]["step"], by_name["preempted"]["max_steps"]) == (2, 6)
    assert "waiting to resume" in by_name["preempted"]["status_detail"]
    # Its footprint so far (the CSV) plus the 4 steps left at its rate: more than so far.
    assert by_name["preempted"]["projected_kg_co2eq"] > by_name["preempted"]["kg_co2eq"] > 0
    assert summary["totals"]["runs"] == 4 and summary["totals"]["status"]["finished"] == 2

    # The sweep: each point knows its sweep and value; both W&B runs are in the sweep's group.
    (sweep,) = summary["sweeps"]
    assert sweep["params"] == ["train.lr"] and len(sweep["runs"]) == 2
    for lr in ("0.001", "0.003"):
        point = RunDir(runs / "sweep" / f"lr{lr}").read_sweep()
        assert point is not None and point.id == sweep["id"] and point.params == {"train.lr": lr}
        assert by_name[f"sweep/lr{lr}"]["sweep"]["params"] == {"train.lr": lr}
        (log,) = (runs / "sweep" / f"lr{lr}" / "wandb").glob("offline-run-*/run-*.wandb")
        groups = [r.run.run_group for r in wandb_records(log) if r.WhichOneof("record_type") == "run"]
        assert groups == [sweep["id"]]


def test_a_running_run_gains_points_without_reloading_the_page(project: dict[str, Any]) -> None:
    browser = project["browser"]
    before = browser.evaluate("dashboard.pointCount('live')")
    assert before >= 1
    browser.evaluate("window.sameDocument = 'yes'")  # lost if the page reloaded
    browser.wait_for(f"dashboard.pointCount('live') >= {before + 3}", timeout=180, what="three new points")
    assert browser.evaluate("window.sameDocument") == "yes"
    # The page asks only for what it lacks: after its cursor, the few lines the run wrote since.
    live = next(r for r in get_json(project["url"] + "api/summary")["runs"] if r["name"] == "live")
    known = browser.evaluate(f"dashboard.state.series['{live['id']}'].entries.length")
    generation = browser.evaluate(f"dashboard.state.series['{live['id']}'].generation")
    update = get_json(project["url"] + f"api/updates?cursor={live['id']}:{generation}:{known}")
    part = update["series"].get(live["id"], {"start": known, "reset": False, "entries": []})
    assert part["start"] == known and not part["reset"] and len(part["entries"]) < known
    assert all(entry["step"] > before for entry in part["entries"])
    # Its ETA: the steps left at the pace of this invocation, in the table too.
    assert live["status"] == "running" and live["tokens_per_second"] > 0
    eta = (live["max_steps"] - live["step"]) * live["seconds_per_step"]
    assert live["eta_s"] > 0 and math.isclose(live["eta_s"], eta, rel_tol=1e-9)
    shown = browser.evaluate("document.querySelector('tr.run[data-name=live] td:nth-child(5)').textContent")
    assert re.fullmatch(r"\d+(\.\d)? (s|min|h|d)", shown), shown


def test_a_run_killed_with_kill_9_shows_as_failed(project: dict[str, Any]) -> None:
    browser = project["browser"]
    kill_tree(project["processes"]["live"], signal.SIGKILL)
    browser.wait_for(
        "dashboard.state.summary.runs.find(r => r.name === 'live').status === 'failed'", timeout=60, what="failed"
    )
    detail = browser.evaluate("dashboard.state.summary.runs.find(r => r.name === 'live').status_detail")
    assert "ended without writing status.json" in detail
    assert not (project["runs"] / "live" / "status.json").exists()
    assert browser.evaluate("dashboard.pointCount('live')") >= 4  # its history stays on the chart


def test_the_projects_co2_is_the_sum_of_every_runs_emissions_csv_rows(project: dict[str, Any]) -> None:
    kwh, kg, rows = csv_totals(project["runs"])
    assert rows >= 4 and kg > 0  # one row per invocation per node: every run, the killed one included
    summary = get_json(project["url"] + "api/summary")
    assert math.isclose(summary["totals"]["kg_co2eq"], kg, rel_tol=1e-9)
    assert math.isclose(summary["totals"]["energy_kwh"], kwh, rel_tol=1e-9)
    for run in summary["runs"]:
        _, run_kg, _ = csv_totals(project["runs"] / run["name"])
        assert math.isclose(run["kg_co2eq"], run_kg, rel_tol=1e-9), run["name"]
        assert run["nodes"][0]["invocations"] == 1
        assert math.isclose(run["kg_co2eq_per_million_tokens"], run_kg / run["tokens"] * 1e6, rel_tol=1e-9)
    browser = project["browser"]
    browser.wait_for(f"Math.abs(dashboard.state.summary.totals.kg_co2eq - {kg}) <= {kg * 1e-9}", timeout=30)
    shown = browser.evaluate("document.querySelector('[data-total=emissions] .value').textContent")
    assert shown.endswith(" kg CO2eq") and math.isclose(float(shown.split()[0]), kg, rel_tol=5e-4), shown


def test_screenshot_of_the_dashboard(project: dict[str, Any]) -> None:
    browser = project["browser"]
    png = project["root"] / "dashboard.png"
    browser.screenshot(png)
    import matplotlib.image

    pixels = matplotlib.image.imread(png)[..., :3]  # (H, W, 3) floats in [0, 1]
    assert pixels.shape[:2] == (1800, 1400) and pixels.std() > 0.05
    # Drawn charts, not empty frames: the runs' line colors (the page's palette, in the order of their names:
    # live, preempted, the two points) cover many pixels.
    covered = [
        (np.abs(pixels * 255 - np.array(rgb)).max(axis=-1) < 16).sum()
        for rgb in ((0x25, 0x63, 0xEB), (0xDC, 0x26, 0x26), (0x16, 0xA3, 0x4A), (0x93, 0x33, 0xEA))
    ]
    assert covered[0] > 400 and sum(covered[1:]) > 200, covered
    shutil.copy(png, project["runs"].parent / "screenshot-for-people.png")  # for a person to look at


def test_the_exported_page_is_one_self_contained_file(project: dict[str, Any]) -> None:
    out = project["root"] / "snapshot.html"
    done = run_module("pretrain.dashboard", f"runs_dir={project['runs']}", f"export={out}", check=True)
    assert done.stdout.startswith(f"wrote {out} (4 runs,")
    text = out.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text)  # nothing fetched from anywhere
    assert "<script src" not in text and "<link" not in text
    browser = project["browser"]
    browser.open(out.as_uri())
    browser.wait_for("dashboard.state.summary && dashboard.pointCount('sweep/lr0.001') === 3", timeout=60)
    assert sorted(statuses(browser)) == sorted([*RUNS, "live"])
    assert browser.evaluate("dashboard.state.polls") == 0  # a snapshot: it asks no server for anything


def test_bad_input_is_one_line_or_an_empty_page(project: dict[str, Any], tmp_path: Path) -> None:
    missing = run_module("pretrain.dashboard", f"runs_dir={tmp_path / 'nowhere'}")
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        f"error: runs_dir={str(tmp_path / 'nowhere')!r} is not a directory: pass the directory holding your runs "
        "(the parent of each run_dir of python -m pretrain)"
    ]
    bad = run_module("pretrain.dashboard", f"runs_dir={tmp_path}", "port=70000", "refresh_s=0")
    assert bad.returncode == 2 and "port=70000" in bad.stderr and "refresh_s=0" in bad.stderr
    empty = tmp_path / "empty.html"
    run_module("pretrain.dashboard", f"runs_dir={tmp_path}", f"export={empty}", check=True)
    browser = project["browser"]
    browser.open(empty.as_uri())
    text = browser.wait_for("!document.getElementById('empty').hidden && document.getElementById('empty').textContent")
    assert "No runs under" in text
