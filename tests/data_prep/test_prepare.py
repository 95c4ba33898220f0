"""How a run behaves as a whole: the same bytes for any number of workers, a kill -9 followed by a rerun, a
rerun of a finished run, and a reused tokenizer."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from tests.data_prep.test_roundtrip import load_manifest_json
from tests.support import REPO, TINY_PREP, run_module


def _file_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file of a dataset directory (manifest.json excluded: compared field by field)."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.iterdir())
        if p.is_file() and p.name != "manifest.json"
    }


def test_one_and_two_workers_write_identical_bytes(tmp_path: Path, small_corpus: Path) -> None:
    manifests = {}
    for workers in (1, 2):
        out = tmp_path / f"workers{workers}"
        run_module(
            "data_prep",
            f"input=[{small_corpus}]",
            f"output_dir={out}",
            *TINY_PREP,
            f"num_workers={workers}",
            "task_mb=0.2",  # about one book per task, so that two workers really share the work
            check=True,
        )
        manifests[workers] = load_manifest_json(out)
    one, two = _file_hashes(tmp_path / "workers1"), _file_hashes(tmp_path / "workers2")
    assert len(one) > 10
    assert one == two
    # The manifests differ only where the settings differ: the worker count and the output directory.
    for manifest in manifests.values():
        del manifest["config"]["num_workers"], manifest["config"]["output_dir"]
    assert manifests[1] == manifests[2]


# ---- kill -9 and rerun ---------------------------------------------------------------------------------------


def _demo_args(demo_books: Path, out: Path) -> list[str]:
    # The whole demo corpus (about 12 MB: several seconds of encoding) in many small shards.
    return [
        f"input=[{demo_books}]",
        f"output_dir={out}",
        "seq_len=256",
        "tokenizer.vocab_size=1024",
        "tokenizer.sample_lines=20000",
        "shard_size_mb=1",
        "num_workers=2",
        "task_mb=1",
    ]


@dataclass
class Interrupted:
    out: Path
    args: list[str]
    left_behind: list[str]  # the files in output_dir right after the kill
    descendants: list[psutil.Process]  # the killed run's worker processes (and multiprocessing's helper)
    commands: list[str]  # their command lines


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory: pytest.TempPathFactory, demo_books: Path) -> Iterator[Interrupted]:
    """A run of the demo corpus killed with SIGKILL once slice 0 has checkpointed its first complete shard.

    The run stops itself there (DATA_PREP_FAULT), so the kill lands between that checkpoint and the slice's
    completion marker however fast the machine encodes: watching for the shard file and killing raced the
    marker (a fast machine finished slice 0 before the kill, and the rerun had nothing to resume).
    """
    out = tmp_path_factory.mktemp("interrupted") / "data"
    args = _demo_args(demo_books, out)
    log = out.parent / "killed-run.log"
    with open(log, "wb") as handle:
        process = subprocess.Popen(
            [sys.executable, "-m", "data_prep", *args],
            cwd=REPO,
            stdout=handle,
            stderr=subprocess.STDOUT,
            env={**os.environ, "DATA_PREP_FAULT": "stall_after_shards:0:1"},
        )
    descendants: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 300
        while "slice 0 stalls after" not in log.read_text():
            assert process.poll() is None, f"the run ended before its first shard:\n{log.read_text()}"
            assert time.monotonic() < deadline, "no shard after 300 s"
            time.sleep(0.01)
        descendants = psutil.Process(process.pid).children(recursive=True)
        commands = [" ".join(child.cmdline()) for child in descendants]
        assert process.poll() is None, "the run finished before it could be killed"
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        yield Interrupted(out, args, sorted(p.name for p in out.iterdir()), descendants, commands)
    finally:
        if process.poll() is None:
            process.kill()
        for child in descendants:  # processes this fixture started: never leave them behind
            if child.is_running():
                child.kill()


@pytest.fixture(scope="module")
def resumed(interrupted: Interrupted) -> subprocess.CompletedProcess[str]:
    """The same command run again after the kill."""
    return run_module("data_prep", *interrupted.args, check=True)


def test_killed_run_leaves_no_manifest(interrupted: Interrupted) -> None:
    assert "manifest.json" not in interrupted.left_behind
    assert interrupted.left_behind == [".data_prep"]  # killed mid-encoding, as intended: no shard in place yet


def test_workers_exit_when_the_main_process_is_killed(interrupted: Interrupted) -> None:
    """A killed main process (OOM killer, scheduler, kill -9) must not leave its workers waiting forever."""
    assert sum("spawn_main" in command for command in interrupted.commands) == 2, interrupted.commands
    _, alive = psutil.wait_procs(interrupted.descendants, timeout=15)
    assert not alive, f"still running 15 s after the main process was killed: {[p.pid for p in alive]}"


def test_rerun_after_kill_equals_a_clean_run(
    interrupted: Interrupted, resumed: subprocess.CompletedProcess[str], tmp_path: Path, demo_books: Path
) -> None:
    # From the last complete shard, not from the start: the tokenizer and the shards the kill left are reused.
    assert "tokenizer: trained" not in resumed.stdout
    resumed_after = re.search(r"slice 0: resuming after (\d+) complete shards", resumed.stdout)
    assert resumed_after and int(resumed_after.group(1)) >= 1, resumed.stdout
    clean = tmp_path / "clean"
    run_module("data_prep", *_demo_args(demo_books, clean), check=True)
    resumed_hashes, clean_hashes = _file_hashes(interrupted.out), _file_hashes(clean)
    assert len(clean_hashes) > 10 and resumed_hashes == clean_hashes
    resumed_manifest, clean_manifest = load_manifest_json(interrupted.out), load_manifest_json(clean)
    for manifest in (resumed_manifest, clean_manifest):
        del manifest["config"]["output_dir"]
    assert resumed_manifest == clean_manifest
    assert not (interrupted.out / ".data_prep").exists()
    assert not list(interrupted.out.glob(".*.tmp"))


def test_rerun_of_a_finished_run_is_up_to_date_and_touches_nothing(
    interrupted: Interrupted, resumed: subprocess.CompletedProcess[str]
) -> None:
    def state() -> dict[str, int]:
        return {p.name: p.stat().st_mtime_ns for p in interrupted.out.iterdir()}

    before = state()
    done = run_module("data_prep", *interrupted.args)
    assert done.returncode == 0, done.stderr
    assert "up to date" in done.stdout
    assert state() == before


# ---- a given tokenizer ------------------------------------------------------------------------------------------

# The settings (besides the tokenizer's) that decide the shards' bytes.
SHAPING_SETTINGS = ("seq_len", "val_fraction", "split_passage_chars", "shard_size_mb", "text_field")


def test_given_tokenizer_is_used_without_training(tmp_path: Path, small_corpus: Path, tiny_dataset: Path) -> None:
    out = tmp_path / "out"
    original = load_manifest_json(tiny_dataset)
    same_settings = [f"{key}={original['config'][key]}" for key in SHAPING_SETTINGS]
    done = run_module(
        "data_prep",
        f"input=[{small_corpus}]",
        f"output_dir={out}",
        f"tokenizer.model_path={tiny_dataset / 'tokenizer.model'}",
        *same_settings,
        check=True,
    )
    assert "tokenizer: trained" not in done.stdout
    reused = load_manifest_json(out)
    assert reused["tokenizer_sha256"] == original["tokenizer_sha256"]
    assert reused["tokenizer_sha256"] == hashlib.sha256((out / "tokenizer.model").read_bytes()).hexdigest()
    # Same tokenizer, same text, same settings: the same shards.
    assert _file_hashes(out) == _file_hashes(tiny_dataset)
    assert json.dumps(reused["splits"]) == json.dumps(original["splits"])
