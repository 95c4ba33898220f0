"""Training on a data mixture with real DeepSpeed engines on gloo ranks (torchrun): the shares and per-source
metrics against the sample trace, W&B and the evaluation, an exact resume from 2 ranks on 1, a reweight
mid-run and a loss-spike rollback right after it. Sources: tiny_dataset ("books", ~7,000 samples) and
poems_dataset ("poems", ~230), one tokenizer."""

from __future__ import annotations

import json
import math
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from pretrain.core.callbacks.metrics_file import read_metrics
from pretrain.core.mixture import MixtureOrder, MixtureState
from pretrain.core.sample_order import GlobalOrder
from pretrain.report import write_report
from tests.pretrain.core.callbacks.test_tracking import history_rows, wandb_records
from tests.support import TINY_RUN, complete_checkpoints, read_state, run_distributed, run_module

STEPS, BATCH, SEQ_LEN = 20, 32, 64
SOURCES = ("books", "poems")


def mixture_args(sources: tuple[Path, Path], run: Path, weights: tuple[float, float], *extra: str) -> list[str]:
    return [
        f"run_dir={run}",
        *TINY_RUN,
        f"data_dirs=[{sources[0]},{sources[1]}]",
        f"data_weights=[{weights[0]},{weights[1]}]",
        "train.micro_batch_size=4",
        f"train.global_batch_size={BATCH}",
        f"train.max_steps={STEPS}",
        "train.trace_samples=true",
        "eval.interval=10",
        "eval.samples=16",
        "carbon.enabled=false",
        *extra,
    ]


def entries(run: Path, kind: str) -> dict[int, dict[str, Any]]:
    return {e["step"]: e for e in read_metrics(run / "metrics.jsonl") if e["kind"] == kind}


def traced(run: Path) -> dict[int, list[str]]:
    """Step -> the samples it consumed on all ranks, as `<source>/<number>`, sorted."""
    by_step: dict[int, list[str]] = {}
    for trace in sorted(run.glob("samples-rank*.jsonl")):
        for line in trace.read_text().splitlines():
            entry = json.loads(line)
            by_step.setdefault(entry["step"], []).extend(entry["samples"])
    return {step: sorted(samples) for step, samples in sorted(by_step.items())}


def per_source(samples: list[str]) -> Counter[str]:
    return Counter(sample.split("/")[0] for sample in samples)


@pytest.fixture(scope="module")
def straight(mixture_sources: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 steps on 2 ranks, books 0.7 and poems 0.3, W&B offline: the run the others are compared with."""
    run = tmp_path_factory.mktemp("straight")
    run_distributed(2, "pretrain", *mixture_args(mixture_sources, run, (0.7, 0.3)))
    return run


@pytest.fixture(scope="module")
def half(mixture_sources: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same run on 2 ranks, stopped after 10 steps (as a preemption would): resumed by the tests below."""
    run = tmp_path_factory.mktemp("half")
    args = mixture_args(mixture_sources, run, (0.7, 0.3), "train.steps_per_run=10", "wandb.mode=disabled")
    assert "stopped at step 10" in run_distributed(2, "pretrain", *args).stdout
    return run


def test_shares_and_per_source_metrics_match_the_sample_trace(straight: Path) -> None:
    train, trace = entries(straight, "train"), traced(straight)
    assert sorted(train) == sorted(trace) == list(range(1, STEPS + 1))
    consumed: Counter[str] = Counter()
    for step, samples in trace.items():
        assert len(samples) == BATCH and len(set(samples)) == BATCH
        in_step = per_source(samples)
        # Every step holds each source's share of its 32 samples, rounded down or up (0.7 * 32 = 22.4).
        assert in_step["books"] in (22, 23), (step, in_step)
        consumed += in_step
        for name in SOURCES:  # tokens/<source>: a recount of the trace
            assert train[step][f"tokens/{name}"] == consumed[name] * SEQ_LEN, (step, name)
        assert sum(train[step][f"tokens/{name}"] for name in SOURCES) == train[step]["tokens"]
    share = train[STEPS]["tokens/books"] / train[STEPS]["tokens"]
    assert abs(share - 0.7) <= 0.02, share
    # Nothing read twice: neither source has gone round an epoch yet.
    every = [s for samples in trace.values() for s in samples]
    assert len(set(every)) == len(every)

    mixtures = list(entries(straight, "mixture").values())
    assert len(mixtures) == 1 and mixtures[0]["step"] == 0
    assert (mixtures[0]["data_weight/books"], mixtures[0]["data_weight/poems"]) == (0.7, 0.3)

    evals = entries(straight, "eval")
    assert sorted(evals) == [10, 20]
    for entry in evals.values():
        # Each source evaluated its first 16 validation samples; the overall loss is their token-weighted mean.
        assert entry["eval_samples"] == 32
        mean = (entry["val_loss/books"] + entry["val_loss/poems"]) / 2
        assert math.isclose(entry["val_loss"], mean, rel_tol=1e-9)
        for name in SOURCES:
            assert math.isclose(entry[f"val_perplexity/{name}"], math.exp(entry[f"val_loss/{name}"]))
    assert evals[20]["val_loss/books"] != evals[20]["val_loss/poems"]

    # W&B got the same per-source figures, and the mixture's weights at step 0.
    folder = next((straight / "wandb").glob("offline-run-*"))
    rows = history_rows(wandb_records(next(folder.glob("run-*.wandb"))))
    logged = {row["step"]: row for row in rows if "loss" in row}
    for step, entry in train.items():
        assert logged[step]["tokens/books"] == entry["tokens/books"]
        assert logged[step]["tokens/poems"] == entry["tokens/poems"]
    assert any(row.get("val_loss/poems") == evals[20]["val_loss/poems"] for row in rows)
    assert any(row.get("data_weight/books") == 0.7 and row["step"] == 0 for row in rows)


def test_evaluate_reports_each_source_and_their_mean(straight: Path, tmp_path: Path) -> None:
    output = tmp_path / "result.json"
    done = run_module("pretrain.evaluate", f"run_dir={straight}", f"output={output}", check=True)
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 3 and lines[-1].startswith("all 2 sources: 32 sequences")
    got, final = json.loads(output.read_text()), entries(straight, "eval")[STEPS]
    assert abs(got["loss"] - final["val_loss"]) < 1e-4
    for name in SOURCES:
        assert got["sources"][name]["sequences"] == 16
        assert abs(got["sources"][name]["loss"] - final[f"val_loss/{name}"]) < 1e-4


def test_resume_from_two_ranks_on_one_rank_is_exact(
    half: Path, straight: Path, mixture_sources: tuple[Path, Path], tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(half, run)
    args = mixture_args(mixture_sources, run, (0.7, 0.3), "wandb.mode=disabled")
    resumed = run_distributed(1, "pretrain", *args)
    assert "resumed from" in resumed.stdout and "at step 10" in resumed.stdout
    assert "data mixture" not in resumed.stdout  # the same mixture goes on: nothing to announce
    assert traced(run) == traced(straight)  # every step, the samples of the uninterrupted 2-rank run
    expected, got = entries(straight, "train"), entries(run, "train")
    for step in range(1, STEPS + 1):
        assert math.isclose(got[step]["loss"], expected[step]["loss"], rel_tol=1e-4, abs_tol=1e-5), step
        for name in SOURCES:
            assert got[step][f"tokens/{name}"] == expected[step][f"tokens/{name}"]


def test_a_reweight_mid_run(half: Path, mixture_sources: tuple[Path, Path], tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(half, run)
    new = (0.3, 0.7)
    refused = run_module("pretrain", *mixture_args(mixture_sources, run, new))
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        f"error: invalid config: data_weights=[0.3, 0.7]: the run trained on books 0.7, poems 0.3 (since step 0, "
        f"checkpoint {run / 'checkpoints' / 'step-00000010'}), this config gives books 0.3, poems 0.7: resume with "
        "the run's data, or add data_reweight=true to switch to the new mixture from the resumed step on"
    ]

    done = run_distributed(2, "pretrain", *mixture_args(mixture_sources, run, new, "data_reweight=true"))
    assert "data mixture from step 10: books 0.3, poems 0.7 (was books 0.7, poems 0.3)" in done.stdout
    train, trace = entries(run, "train"), traced(run)
    assert sorted(trace) == list(range(1, STEPS + 1))
    for step in range(11, STEPS + 1):
        assert per_source(trace[step])["poems"] in (22, 23), step  # the new shares, from the resumed step on
    poems_after = train[STEPS]["tokens/poems"] - train[10]["tokens/poems"]
    assert abs(poems_after / (train[STEPS]["tokens"] - train[10]["tokens"]) - 0.7) <= 0.02

    # Each source went on where it was: the samples of every step are the next positions of its own order.
    # Poems (its ~230 samples) went round into a second epoch, a new permutation; books never repeated.
    state = read_state(complete_checkpoints(run)[-1])["mixture"]
    records = {record["name"]: record for record in state["sources"].values()}
    assert [(s["step"], s["start"]) for s in state["segments"]] == [(0, 0), (10, 10 * BATCH)]
    for name in SOURCES:
        record = records[name]
        order, position = GlobalOrder(record["samples"], record["seed"]), 0
        for step in range(1, STEPS + 1):
            count = per_source(trace[step])[name]
            expected = sorted(f"{name}/{order(j)}" for j in range(position, position + count))
            assert [s for s in trace[step] if s.startswith(f"{name}/")] == expected, (name, step)
            position += count
        assert position * SEQ_LEN == train[STEPS][f"tokens/{name}"]
    assert train[STEPS]["tokens/poems"] // SEQ_LEN > records["poems"]["samples"]  # it repeated
    books = [s for samples in trace.values() for s in samples if s.startswith("books/")]
    assert len(set(books)) == len(books)

    # The change is in metrics.jsonl and in W&B at the step it happened.
    change = entries(run, "mixture")[10]
    assert change["consumed_samples"] == 10 * BATCH and change["previous"] == {"books": 0.7, "poems": 0.3}
    assert (change["data_weight/books"], change["data_weight/poems"]) == new
    folder = next((run / "wandb").glob("offline-run-*"))
    rows = history_rows(wandb_records(next(folder.glob("run-*.wandb"))))
    assert any(row["step"] == 10 and row.get("data_weight/poems") == 0.7 for row in rows)

    # The report shows each source's tokens and validation loss, and where the mixture changed.
    page = write_report(run).read_text()
    assert page.count('src="data:image/png;base64,') == 5  # loss, lr, throughput, tokens and val loss per source
    assert "Tokens per source" in page and "Validation loss per source" in page
    assert "data mixture from step 10" in page and "books 0.3, poems 0.7" in page
    assert f"{train[STEPS]['tokens/poems']:,} tokens" in page


def test_a_rollback_right_after_a_reweight_keeps_the_new_mixture(
    half: Path, mixture_sources: tuple[Path, Path], tmp_path: Path
) -> None:
    # The resume switches the weights at step 10 (from the checkpoint of step 10, written with the old ones), and
    # the batch of step 14 spikes before any new checkpoint: the rollback goes back to step 10's checkpoint, which
    # lacks the new mixture, so it must apply the switch again from the same cursor, and record it there.
    run = tmp_path / "run"
    shutil.copytree(half, run)
    extra = ("data_reweight=true", "checkpoint.interval=10", "rollback.enabled=true", "rollback.window=2")
    args = mixture_args(mixture_sources, run, (0.3, 0.7), *extra, "wandb.mode=disabled")
    done = run_distributed(2, "pretrain", *args, env={"PRETRAIN_FAULT": "spike_loss:14"})
    rollbacks = [e for e in read_metrics(run / "metrics.jsonl") if e["kind"] == "rollback"]
    assert [(e["step"], e["to_step"], e["skipped_samples"]) for e in rollbacks] == [(14, 10, 4 * BATCH)], done.stdout
    skipped = 4 * BATCH
    # Step 10's checkpoint now holds the skip and the mixture it skips in, so a resume from it repeats both.
    amended = read_state(run / "checkpoints" / "step-00000010")
    assert amended["trainer"]["consumed_samples"] == 10 * BATCH + skipped
    assert [(s["step"], s["start"]) for s in amended["mixture"]["segments"]] == [(0, 0), (10, 10 * BATCH)]
    final = read_state(complete_checkpoints(run)[-1])
    assert final["mixture"] == amended["mixture"] and final["trainer"]["step"] == STEPS
    # Steps 11-20 trained the new mixture's next positions after the skipped window, exactly.
    mixture = MixtureState.from_state_dict(final["mixture"])
    ids = sorted(mixture.sources, key=lambda s: SOURCES.index(mixture.sources[s].name))
    offsets = {ids[0]: 0, ids[1]: mixture.sources[ids[0]].samples}
    order = MixtureOrder(mixture, offsets)

    def label(position: int) -> str:
        sample = order(position)
        first = sample < offsets[ids[1]]
        return f"{SOURCES[0]}/{sample}" if first else f"{SOURCES[1]}/{sample - offsets[ids[1]]}"

    trace = traced(run)
    assert sorted(trace) == list(range(1, STEPS + 1))
    for step in range(11, STEPS + 1):
        start = (step - 1) * BATCH + skipped
        assert trace[step] == sorted(label(p) for p in range(start, start + BATCH)), step
