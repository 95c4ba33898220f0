"""End-to-end training on real shards with real DeepSpeed engines on gloo ranks (started by torchrun).

Each test reads what a user would read: metrics.jsonl, the checkpoints, the exit code and the console.
"""

from __future__ import annotations

import json
import math
import signal
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from data_prep.manifest import load_manifest
from pretrain.core.callbacks.metrics_file import read_metrics
from pretrain.core.data import GlobalOrder
from tests.support import complete_checkpoints, kill_tree, run_distributed, run_module, start_distributed, tiny_run_args


def train_args(data: Path, run: Path, *extra: str) -> list[str]:
    return tiny_run_args(data, run, "eval.samples=16", *extra)


def losses(run: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in read_metrics(run / "metrics.jsonl") if e["kind"] == "train"}


def traced_samples(run: Path) -> dict[int, list[int]]:
    """Step -> every sample consumed at that step, over all ranks (sorted)."""
    by_step: dict[int, list[int]] = {}
    for trace in sorted(run.glob("samples-rank*.jsonl")):
        for line in trace.read_text().splitlines():
            entry = json.loads(line)
            by_step.setdefault(entry["step"], []).extend(entry["samples"])
    return {step: sorted(samples) for step, samples in by_step.items()}


@pytest.fixture(scope="module")
def reference(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One rank, ZeRO-0: the run every layout must reproduce."""
    run = tmp_path_factory.mktemp("reference")
    run_distributed(1, "pretrain", *train_args(tiny_dataset, run, "train.max_steps=6", "train.trace_samples=true"))
    return run


@pytest.mark.parametrize("zero_stage", [0, 1, 2, 3])
def test_two_ranks_match_one_rank_for_every_zero_stage(
    zero_stage: int, reference: Path, tiny_dataset: Path, tmp_path: Path
) -> None:
    run_distributed(2, "pretrain", *train_args(tiny_dataset, tmp_path, "train.max_steps=6", f"zero_stage={zero_stage}"))
    expected, got = losses(reference), losses(tmp_path)
    assert sorted(got) == list(range(1, 7))
    for step in expected:
        assert math.isclose(got[step], expected[step], rel_tol=1e-4, abs_tol=1e-5), (step, got[step], expected[step])
    # The loss moved: the runs trained, not just evaluated the initial weights.
    assert got[6] < got[1] - 0.05
    # Generation works on this ZeRO stage's checkpoint and agrees with the reference's (greedy decoding).
    outputs = [
        run_module(
            "pretrain.generate", f"run_dir={run}", "prompt=It was", "max_new_tokens=12", "temperature=0", check=True
        ).stdout
        for run in (reference, tmp_path)
    ]
    assert outputs[0] == outputs[1]
    assert len(outputs[0]) > len("It was\n")  # 12 tokens were generated (a barely trained model: often newlines)


def test_resume_is_exact(tiny_dataset: Path, tmp_path: Path) -> None:
    """2N steps in one go == N steps, restart, N more (2 ranks, ZeRO-2): same losses, same samples."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    common = ("zero_stage=2", "train.trace_samples=true", "checkpoint.interval=0", "model.dropout=0.1")
    run_distributed(2, "pretrain", *train_args(tiny_dataset, whole, "train.max_steps=8", *common))
    # The first invocation stops after 4 of the 8 steps (as a preemption would), the second one resumes.
    args = train_args(tiny_dataset, split, "train.max_steps=8", "train.steps_per_run=4", *common)
    assert "stopped at step 4" in run_distributed(2, "pretrain", *args).stdout
    assert json.loads((split / "status.json").read_text())["requeue"] is True
    resumed = run_distributed(2, "pretrain", *train_args(tiny_dataset, split, "train.max_steps=8", *common))
    assert "resumed from" in resumed.stdout and "at step 4" in resumed.stdout
    expected, got = losses(whole), losses(split)
    assert sorted(got) == list(range(1, 9))
    for step in range(1, 9):
        assert math.isclose(got[step], expected[step], rel_tol=1e-5, abs_tol=1e-6), (step, got[step], expected[step])
    assert traced_samples(split) == traced_samples(whole)


def test_cursor_survives_a_change_of_world_size(tiny_dataset: Path, reference: Path, tmp_path: Path) -> None:
    """2 ranks for 3 steps, then 1 rank to step 6: every step sees the samples of the uninterrupted run."""
    common = ("train.trace_samples=true", "train.max_steps=6")
    run_distributed(2, "pretrain", *train_args(tiny_dataset, tmp_path, *common, "train.steps_per_run=3"))
    resumed = run_distributed(1, "pretrain", *train_args(tiny_dataset, tmp_path, *common))
    assert "at step 3" in resumed.stdout
    assert "written with" not in resumed.stdout  # ZeRO-0: DeepSpeed loads it as it is, no conversion
    # Same schedule, same samples: the losses are the 1-rank reference's too.
    for step, loss in losses(reference).items():
        assert math.isclose(losses(tmp_path)[step], loss, rel_tol=1e-4, abs_tol=1e-5), step
    got, expected = traced_samples(tmp_path), traced_samples(reference)
    assert got == expected
    # And those are exactly the global order's positions 0..47: nothing repeated, nothing skipped.
    manifest = load_manifest(tiny_dataset)
    order = GlobalOrder(manifest.splits["train"].samples, seed=1234)
    consumed = [s for step in sorted(got) for s in got[step]]
    assert sorted(consumed) == sorted(order(p) for p in range(48))
    assert len(set(consumed)) == len(consumed)


def _wait_for(predicate, timeout: float, process) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if process.poll() is not None:
            raise AssertionError(f"run ended early ({process.returncode}):\n{process.stdout.read()[-4000:]}")
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.2)


def test_kill_9_during_training_resumes_from_latest_checkpoint(tiny_dataset: Path, tmp_path: Path) -> None:
    args = train_args(tiny_dataset, tmp_path, "train.max_steps=400", "checkpoint.interval=3", "zero_stage=1")
    process = start_distributed(2, "pretrain", *args)
    _wait_for(lambda: len(complete_checkpoints(tmp_path)) >= 2, 300, process)
    kill_tree(process, signal.SIGKILL)
    kept = complete_checkpoints(tmp_path)
    assert kept, "no complete checkpoint survived"
    resumed_from = int(kept[-1].name.split("-")[1])
    args[args.index("train.max_steps=400")] = f"train.max_steps={resumed_from + 3}"
    done = run_distributed(2, "pretrain", *args)
    assert f"at step {resumed_from}" in done.stdout
    assert max(losses(tmp_path)) == resumed_from + 3
    assert sorted(losses(tmp_path)) == list(range(1, resumed_from + 4))  # history without gaps or repeats


def test_kill_9_during_a_checkpoint_save_keeps_the_previous_one(tiny_dataset: Path, tmp_path: Path) -> None:
    args = train_args(tiny_dataset, tmp_path, "train.max_steps=6", "checkpoint.interval=2", "zero_stage=2")
    # Real torchrun: its agent ends the surviving rank (and the killed rank's data-loader worker, which ignores
    # stop signals and holds the output open) where the fork-server runner waits for them until its timeout.
    fault = {"PRETRAIN_FAULT": "kill_during_save:4"}
    crashed = run_distributed(2, "pretrain", *args, env=fault, check=False, launcher="torchrun")
    assert crashed.returncode != 0
    checkpoints = tmp_path / "checkpoints"
    assert (checkpoints / "step-00000004").is_dir()  # DeepSpeed wrote its files ...
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-00000002"]  # ... but never committed
    assert (checkpoints / "latest").read_text().strip() == "step-00000002"
    done = run_distributed(2, "pretrain", *args)
    assert "resumed from" in done.stdout and "at step 2" in done.stdout
    assert [p.name for p in complete_checkpoints(tmp_path)][-1] == "step-00000006"


def test_non_finite_loss_skips_the_step_then_stops_when_it_persists(tiny_dataset: Path, tmp_path: Path) -> None:
    once = tmp_path / "once"
    run_distributed(
        2, "pretrain", *train_args(tiny_dataset, once, "train.max_steps=5"), env={"PRETRAIN_FAULT": "nan_loss:3"}
    )
    entries = {e["step"]: e for e in read_metrics(once / "metrics.jsonl") if e["kind"] == "train"}
    assert entries[3]["skipped_steps"] == 1 and math.isnan(entries[3]["loss"])
    assert entries[5]["skipped_steps"] == 1 and math.isfinite(entries[5]["loss"])

    persistent = tmp_path / "persistent"
    done = run_distributed(
        2,
        "pretrain",
        *train_args(tiny_dataset, persistent, "train.max_steps=8", "train.max_nonfinite_steps=2"),
        env={"PRETRAIN_FAULT": "nan_loss:3,4"},
        check=False,
    )
    assert done.returncode != 0
    assert "2 non-finite losses in a row" in done.stdout
    assert [p.name for p in complete_checkpoints(persistent)] == ["step-00000004"]


def test_sigterm_checkpoints_and_the_same_command_resumes(tiny_dataset: Path, tmp_path: Path) -> None:
    args = train_args(tiny_dataset, tmp_path, "train.max_steps=2000", "checkpoint.interval=0")
    process = start_distributed(2, "pretrain", *args)
    _wait_for(lambda: len(losses(tmp_path)) >= 3, 300, process)
    # As a scheduler does (Slurm's scancel, Kubernetes): the signal reaches the rank processes. (torchrun
    # itself, signalled directly, forwards it but then exits non-zero whatever its ranks did.)
    for rank in psutil.Process(process.pid).children():
        rank.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=180)
    assert process.returncode == 0, output[-3000:]
    assert "stopped at step" in output and "run the same command to resume" in output
    saved = complete_checkpoints(tmp_path)
    assert len(saved) == 1
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["state"] == "stopped" and status["requeue"] is False  # a SIGTERM stop does not ask to come back
    step = int(saved[0].name.split("-")[1])
    args[args.index("train.max_steps=2000")] = f"train.max_steps={step + 2}"
    done = run_distributed(2, "pretrain", *args)
    assert f"at step {step}" in done.stdout and max(losses(tmp_path)) == step + 2


def test_the_model_learns_real_text(tiny_dataset: Path, tmp_path: Path) -> None:
    """Validation perplexity ends far below the unigram baseline (the best a context-free model can do)."""
    run_distributed(
        1,
        "pretrain",
        f"data_dir={tiny_dataset}",
        f"run_dir={tmp_path}",
        "model=tiny",
        "train.num_workers=1",
        "train.max_steps=300",
        "train.micro_batch_size=16",
        "train.global_batch_size=16",
        "train.lr=3e-3",
        "train.warmup_steps=30",
        "train.log_interval=100",
        "eval.interval=0",
        "eval.samples=64",
    )
    manifest = load_manifest(tiny_dataset)
    counts = np.zeros(manifest.vocab_size)
    import webdataset as wds

    shards = [str(p) for p in manifest.shard_paths(tiny_dataset, "train")]
    for sample in wds.WebDataset(shards, shardshuffle=False).decode():
        np.add.at(counts, np.asarray(sample["tokens.npy"], dtype=np.int64)[1:], 1)
    probs = counts[counts > 0] / counts.sum()
    unigram_perplexity = float(np.exp(-(probs * np.log(probs)).sum()))
    evals = [e for e in read_metrics(tmp_path / "metrics.jsonl") if e["kind"] == "eval"]
    final = evals[-1]["val_perplexity"]
    assert final < 0.5 * unigram_perplexity, (final, unigram_perplexity)
