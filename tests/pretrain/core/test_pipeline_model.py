"""Pipeline parallelism and activation checkpointing: the same training, checked against the plain path."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from common.errors import UserError
from data_prep.manifest import load_manifest
from pretrain.core.callbacks.metrics_file import read_metrics
from pretrain.core.config import RunConfig, validate_run
from tests.pretrain.core.test_trainer import losses, traced_samples
from tests.support import run_distributed, run_module, tiny_run_args


def args(data: Path, run: Path, *extra: str) -> list[str]:
    """4 blocks, so that 2 stages hold 2 blocks each; an evaluation every 3 steps."""
    return tiny_run_args(
        data,
        run,
        "model.n_layer=4",
        "train.max_steps=6",
        "eval.interval=3",
        "eval.samples=12",
        "carbon.enabled=false",
        "wandb.mode=disabled",
        *extra,
    )


def evals(run: Path) -> dict[int, float]:
    return {e["step"]: e["val_loss"] for e in read_metrics(run / "metrics.jsonl") if e["kind"] == "eval"}


def assert_same(got: dict[int, float], expected: dict[int, float], rel: float = 1e-4) -> None:
    assert sorted(got) == sorted(expected) and expected
    for step in expected:
        assert math.isclose(got[step], expected[step], rel_tol=rel, abs_tol=1e-5), (step, got[step], expected[step])


@pytest.fixture(scope="module")
def plain(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("plain")
    run_distributed(1, "pretrain", *args(tiny_dataset, run, "train.trace_samples=true"))
    return run


def test_two_stages_train_like_one_rank(plain: Path, tiny_dataset: Path, tmp_path: Path) -> None:
    run_distributed(2, "pretrain", *args(tiny_dataset, tmp_path, "parallel.pipeline_stages=2", "zero_stage=1"))
    assert_same(losses(tmp_path), losses(plain))
    assert_same(evals(tmp_path), evals(plain))  # evaluation through the pipeline's eval schedule
    counted = {e["eval_samples"] for e in read_metrics(tmp_path / "metrics.jsonl") if e["kind"] == "eval"}
    assert counted == {12}  # each validation sample counted once, not once per stage
    # The pipeline checkpoint maps back onto the plain model: greedy generation agrees with the plain run's.
    outputs = [
        run_module(
            "pretrain.generate", f"run_dir={run}", "prompt=It was", "max_new_tokens=12", "temperature=0", check=True
        ).stdout
        for run in (plain, tmp_path)
    ]
    assert outputs[0] == outputs[1] and len(outputs[0]) > len("It was\n")


def test_pipeline_by_data_parallel_topology(plain: Path, tiny_dataset: Path, tmp_path: Path) -> None:
    """4 ranks: 2 stages x 2 data-parallel replicas; each replica reads its half of every batch."""
    run_distributed(
        4,
        "pretrain",
        *args(tiny_dataset, tmp_path, "parallel.pipeline_stages=2", "train.trace_samples=true"),
        timeout=900,
    )
    assert_same(losses(tmp_path), losses(plain))
    assert traced_samples(tmp_path) == traced_samples(plain)  # first stages only: each sample counted once


def test_resume_under_pipeline_is_exact(tiny_dataset: Path, tmp_path: Path) -> None:
    whole, split = tmp_path / "whole", tmp_path / "split"
    common = ("parallel.pipeline_stages=2", "zero_stage=1", "model.dropout=0.1", "train.trace_samples=true")
    run_distributed(2, "pretrain", *args(tiny_dataset, whole, *common))
    first = run_distributed(2, "pretrain", *args(tiny_dataset, split, *common, "train.steps_per_run=3"))
    assert "stopped at step 3" in first.stdout
    resumed = run_distributed(2, "pretrain", *args(tiny_dataset, split, *common))
    assert "at step 3" in resumed.stdout
    assert_same(losses(split), losses(whole), rel=1e-5)
    assert traced_samples(split) == traced_samples(whole)


def test_activation_checkpointing_gives_the_same_losses(plain: Path, tiny_dataset: Path, tmp_path: Path) -> None:
    checkpointed = tmp_path / "plain_ac"
    run_distributed(1, "pretrain", *args(tiny_dataset, checkpointed, "activation_checkpointing=true"))
    assert_same(losses(checkpointed), losses(plain), rel=1e-5)
    piped = tmp_path / "pipe_ac"
    run_distributed(
        2,
        "pretrain",
        *args(
            tiny_dataset,
            piped,
            "parallel.pipeline_stages=2",
            "activation_checkpointing=true",
            "activation_checkpointing_interval=1",
        ),
    )
    assert_same(losses(piped), losses(plain))


def test_activation_checkpointing_recomputes_under_bf16_autocast(tiny_dataset: Path, tmp_path: Path) -> None:
    """precision=bf16 through the pipeline engine: the recomputed forward runs under autocast as the first one did,
    so the gradients, and the losses, are those without checkpointing (DeepSpeed's own checkpoint function
    recomputes in fp32, and the losses differ from the second step on)."""
    bf16 = ("precision=bf16", "parallel.pipeline_stages=2")
    whole, checkpointed = tmp_path / "pipe_bf16", tmp_path / "pipe_bf16_ac"
    run_distributed(2, "pretrain", *args(tiny_dataset, whole, *bf16))
    run_distributed(2, "pretrain", *args(tiny_dataset, checkpointed, *bf16, "activation_checkpointing=true"))
    assert_same(losses(checkpointed), losses(whole), rel=1e-6)


def test_non_finite_loss_is_skipped_under_pipeline(tiny_dataset: Path, tmp_path: Path) -> None:
    run_distributed(
        2,
        "pretrain",
        *args(tiny_dataset, tmp_path, "parallel.pipeline_stages=2", "eval.interval=0"),
        env={"PRETRAIN_FAULT": "nan_loss:2"},
    )
    entries = {e["step"]: e for e in read_metrics(tmp_path / "metrics.jsonl") if e["kind"] == "train"}
    assert math.isnan(entries[2]["loss"]) and entries[6]["skipped_steps"] == 1
    assert math.isfinite(entries[6]["loss"])


def _problems(world: int, **settings) -> str:
    config = RunConfig()
    config.model.n_layer = 4
    for key, value in settings.items():
        section, _, name = key.partition("__")
        setattr(getattr(config, section) if name else config, name or section, value)
    with pytest.raises(UserError) as raised:
        validate_run(config, None, world)
    return str(raised.value)


def test_each_invalid_layout_is_refused_with_its_reason() -> None:
    assert "parallel.pipeline_stages=3: must divide the world size (4)" in _problems(4, parallel__pipeline_stages=3)
    assert "parallel.pipeline_stages=8: must be <= model.n_layer (4)" in _problems(8, parallel__pipeline_stages=8)
    message = _problems(4, parallel__pipeline_stages=2, zero_stage=2)
    assert "zero_stage=2: with parallel.pipeline_stages=2" in message and "use zero_stage=1 with pipelines" in message
    assert "parallel.pipeline_stages=1 with zero_stage=3" in message
    message = _problems(4, parallel__pipeline_stages=2, train__global_batch_size=6, train__micro_batch_size=2)
    assert (
        "train.global_batch_size=6: must be a multiple of train.micro_batch_size (2) x data-parallel size (2" in message
    )
    # All problems of one layout come in one message.
    message = _problems(6, parallel__pipeline_stages=4, zero_stage=3)
    assert "must divide the world size" in message and "zero_stage=3" in message


def test_invalid_layout_stops_before_any_process_group(tiny_dataset: Path, tmp_path: Path) -> None:
    done = run_distributed(
        2, "pretrain", *args(tiny_dataset, tmp_path, "parallel.pipeline_stages=2", "zero_stage=3"), check=False
    )
    assert done.returncode != 0
    assert "error: invalid config: zero_stage=3: with parallel.pipeline_stages=2" in done.stderr
    # The ranks stopped at validation: no process group was ever initialized (torchrun adds its own report).
    assert "Using topology" not in done.stdout + done.stderr  # printed when a PipelineModule is built
    assert not (tmp_path / "checkpoints").exists()
    assert load_manifest(tiny_dataset).seq_len == 64


def test_a_stage_without_vectors_is_refused_under_zero_not_left_waiting(tiny_dataset: Path, tmp_path: Path) -> None:
    """type:EmbeddingPipe leaves the last stage only the tied head (one matrix). ZeRO-0 trains it (its parameter
    group of vectors is dropped, and the schedule built for the groups left: tests/.../test_reshard.py); under ZeRO-1
    DeepSpeed would reduce norms group by group across stages and wait forever at the first step."""
    done = run_distributed(
        2,
        "pretrain",
        *args(
            tiny_dataset,
            tmp_path,
            "parallel.pipeline_stages=2",
            "zero_stage=1",
            "parallel.partition_method=type:EmbeddingPipe",
        ),
        check=False,
        timeout=300,
    )
    assert done.returncode != 0
    assert "error: parallel.partition_method=type:EmbeddingPipe: a pipeline stage holds only weight" in done.stderr
    assert "use partition_method=type:BlockPipe" in done.stderr
