"""Resuming on another layout: any ZeRO stage, number of ranks, pipeline depth or precision, exactly.

Every run trains the same 12-step schedule in pieces (train.steps_per_run), each piece on another layout; the
reference is the 12 steps in one go on one rank. Checked at each change: the console says what was converted;
the engine's whole training state right after the resume (master weights, AdamW moments and step, learning
rate, schedule position, DeepSpeed's counters), read by tests/pretrain/core/resume_probe.py through DeepSpeed's
public getters, equals bit for bit the state at the end of the previous piece; and over the whole run the loss
of every step and the samples of every step equal the reference's.

The model has d_model=63 so that no parameter's size divides by 2 ranks (uneven ZeRO-3 partitions, ZeRO-1/2
fragments cut mid-parameter). The first 4 steps of each ZeRO stage on 2 ranks are run once and copied.
"""

from __future__ import annotations

import hashlib
import math
import shutil
from pathlib import Path

import pytest
import torch

from tests.pretrain.core.test_trainer import losses, traced_samples
from tests.support import run_distributed, run_module, tiny_run_args

STEPS = 12
PROBE = "tests.pretrain.core.resume_probe"  # `python -m pretrain` plus the state probe


def args(data: Path, run: Path, *extra: str) -> list[str]:
    return tiny_run_args(
        data,
        run,
        "model.d_model=63",
        "model.n_head=3",
        f"train.max_steps={STEPS}",
        "checkpoint.interval=0",  # a checkpoint where each piece stops
        "train.trace_samples=true",
        "carbon.enabled=false",
        "wandb.mode=disabled",
        *extra,
    )


@pytest.fixture(scope="module")
def reference(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("reference")
    run_distributed(1, "pretrain", *args(tiny_dataset, run))
    return run


@pytest.fixture(scope="module")
def first_steps(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory):
    """steps 1-4 on 2 ranks under ZeRO-`stage`, run once per stage; each test continues a copy."""
    done: dict[int, Path] = {}

    def copy_of(stage: int, target: Path) -> Path:
        if stage not in done:
            run = tmp_path_factory.mktemp(f"zero{stage}_first_steps")
            piece(tiny_dataset, run, 2, 4, f"zero_stage={stage}")
            done[stage] = run
        shutil.copytree(done[stage], target)
        return target

    return copy_of


def piece(data: Path, run: Path, nproc: int, steps: int, *layout: str, **kwargs) -> str:
    """Train `steps` more steps of the run on `nproc` ranks with `layout`; returns the console output."""
    done = run_distributed(nproc, PROBE, *args(data, run, f"train.steps_per_run={steps}", *layout), **kwargs)
    return done.stdout


def assert_state_carried(run: Path, step: int) -> dict:
    """The state the previous piece ended with at `step` is the state this piece started from, exactly."""
    before = torch.load(run / f"probe-end-{step}.pt", weights_only=False)
    after = torch.load(run / f"probe-start-{step}.pt", weights_only=False)
    assert sorted(after["params"]) == sorted(before["params"]) and len(before["params"]) >= 28
    for name, tensors in before["params"].items():
        assert sorted(after["params"][name]) == ["exp_avg", "exp_avg_sq", "master"], name
        for kind, value in tensors.items():
            assert torch.equal(after["params"][name][kind], value), (step, name, kind)
    for key in ("adam_step", "schedule_epoch", "global_steps", "global_samples", "skipped_steps"):
        assert after[key] == before[key], (key, after[key], before[key])
    assert after["adam_step"] == [step] and after["schedule_epoch"] == step
    assert set(after["lr"]) == set(before["lr"]) and len(set(after["lr"])) == 1  # every group at the same lr
    return after


def assert_matches_reference(run: Path, reference: Path, rel: float = 1e-4) -> None:
    got, expected = losses(run), losses(reference)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in expected:
        assert math.isclose(got[step], expected[step], rel_tol=rel, abs_tol=1e-5), (step, got[step], expected[step])
    assert got[STEPS] < got[1] - 0.3  # it trained
    assert traced_samples(run) == traced_samples(reference)


def converted(output: str, tag: str) -> bool:
    return f"checkpoint {tag}: written with" in output and f"converting it to {tag}.portable.safetensors" in output


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_resumes_on_fewer_then_more_ranks(
    stage: int, first_steps, reference: Path, tiny_dataset: Path, tmp_path: Path
) -> None:
    """4 steps on 2 ranks, 4 on 1, 4 on 2. Under ZeRO-3 the second change converts a checkpoint written by a
    run that was itself resumed from a converted one (DeepSpeed's universal checkpoints broke this cycle)."""
    run = first_steps(stage, tmp_path / "run")
    zero = f"zero_stage={stage}"
    # A new gradient clipping (inactive here: norms are below 1 after step 2) applies after a conversion.
    output = piece(tiny_dataset, run, 1, 4, zero, "train.grad_clip=2.0")
    assert converted(output, "step-00000004") and "at step 4" in output
    assert assert_state_carried(run, 4)["clip"] == 2.0
    output = piece(tiny_dataset, run, 2, 4, zero)
    assert converted(output, "step-00000008")
    assert_state_carried(run, 8)
    assert_matches_reference(run, reference)


def test_zero_stage_changes_from_1_to_3_to_0(first_steps, reference: Path, tiny_dataset: Path, tmp_path: Path) -> None:
    """With activation checkpointing in the ZeRO-3 piece: its files name every block parameter
    blocks.<i>._checkpoint_wrapped_module.<...>, which both the conversion and generation map back."""
    run = first_steps(1, tmp_path / "run")
    assert converted(piece(tiny_dataset, run, 2, 4, "zero_stage=3", "activation_checkpointing=true"), "step-00000004")
    assert_state_carried(run, 4)
    assert converted(piece(tiny_dataset, run, 1, 4, "zero_stage=0"), "step-00000008")
    assert_state_carried(run, 8)
    assert_matches_reference(run, reference)
    checkpoint = f"checkpoint={run / 'checkpoints' / 'step-00000008'}"
    generated = run_module("pretrain.generate", checkpoint, "prompt=It was", "max_new_tokens=4", check=True)
    assert generated.stdout.startswith("It was")


def test_pipeline_depth_changes_from_1_to_2_to_1(first_steps, reference: Path, tiny_dataset: Path, tmp_path: Path):
    """ZeRO-2 on 2 ranks -> 2 pipeline stages at ZeRO-0 -> 1 rank at ZeRO-1. The pipeline's last stage holds
    only the tied output head (type:EmbeddingPipe), so its optimizer has one parameter group instead of two."""
    run = first_steps(2, tmp_path / "run")
    pipeline = ("zero_stage=0", "parallel.pipeline_stages=2", "parallel.partition_method=type:EmbeddingPipe")
    assert converted(piece(tiny_dataset, run, 2, 4, *pipeline), "step-00000004")
    assert_state_carried(run, 4)
    assert converted(piece(tiny_dataset, run, 1, 4, "zero_stage=1"), "step-00000008")
    assert_state_carried(run, 8)
    assert_matches_reference(run, reference)


def test_zero2_resumes_on_more_ranks_then_fewer(first_steps, reference: Path, tiny_dataset: Path, tmp_path: Path):
    """4 steps on 2 ranks, 4 on 4 (one micro batch per rank and step, uneven fragments over 4), 4 on 1."""
    run = first_steps(2, tmp_path / "run")
    output = piece(tiny_dataset, run, 4, 4, "zero_stage=2")
    assert converted(output, "step-00000004") and "this run: ZeRO-2, 4 data-parallel ranks," in output
    assert_state_carried(run, 4)
    assert sorted(p.name for p in (run / "checkpoints" / "step-00000008").glob("*optim_states.pt")) == [
        f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" for rank in range(4)
    ]
    assert converted(piece(tiny_dataset, run, 1, 4, "zero_stage=2"), "step-00000008")
    assert_state_carried(run, 8)
    assert_matches_reference(run, reference)


# A model of 4 blocks, the fewest 4 pipeline stages can hold, split one block per stage.
FOUR_BLOCKS = ("model.n_layer=4", "parallel.partition_method=type:BlockPipe")


@pytest.fixture(scope="module")
def four_block_reference(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("four_block_reference")
    run_distributed(1, "pretrain", *args(tiny_dataset, run, *FOUR_BLOCKS))
    return run


def test_pipeline_depth_changes_from_2_to_4_to_1(four_block_reference: Path, tiny_dataset: Path, tmp_path: Path):
    """P=2 at ZeRO-0 on 2 ranks -> P=4 at ZeRO-1 on 4 ranks (the first stage holds the embedding and block 0,
    the last block 3, the final norm and the tied head) -> 1 rank at ZeRO-2."""
    run = tmp_path / "run"
    piece(tiny_dataset, run, 2, 4, *FOUR_BLOCKS, "zero_stage=0", "parallel.pipeline_stages=2")
    output = piece(tiny_dataset, run, 4, 4, *FOUR_BLOCKS, "zero_stage=1", "parallel.pipeline_stages=4")
    assert (
        converted(output, "step-00000004") and "this run: ZeRO-1, 4 pipeline stages x 1 data-parallel rank," in output
    )
    assert_state_carried(run, 4)
    assert sorted(p.name for p in (run / "checkpoints" / "step-00000008").glob("*optim_states.pt")) == [
        f"zero_pp_rank_0_mp_rank_{stage:02d}_optim_states.pt" for stage in range(4)
    ]
    assert converted(piece(tiny_dataset, run, 1, 4, *FOUR_BLOCKS, "zero_stage=2"), "step-00000008")
    assert_state_carried(run, 8)
    assert_matches_reference(run, four_block_reference)


def test_bf16_weights_resume_across_their_three_optimizers(reference: Path, tiny_dataset: Path, tmp_path: Path) -> None:
    """bf16-weights runs keep fp32 masters in three different DeepSpeed optimizers: BF16_Optimizer (pipelines at
    ZeRO-0), FP16_UnfusedOptimizer (ZeRO-0) and ZeRO's. The masters and moments carry exactly; the losses are
    bf16's."""
    run = tmp_path / "run"
    bf16 = "precision=bf16-weights"
    piece(tiny_dataset, run, 2, 4, bf16, "zero_stage=0", "parallel.pipeline_stages=2")
    assert converted(piece(tiny_dataset, run, 1, 4, bf16, "zero_stage=0"), "step-00000004")
    assert_state_carried(run, 4)
    assert converted(piece(tiny_dataset, run, 2, 4, bf16, "zero_stage=3"), "step-00000008")
    assert_state_carried(run, 8)
    assert_matches_reference(run, reference, rel=1e-3)  # bf16 against the fp32 reference (measured: 7e-5)


def test_bf16_autocast_resumes_as_fp32_natively_and_converts_to_other_layouts(
    reference: Path, tiny_dataset: Path, tmp_path: Path
) -> None:
    """precision=bf16 (torch.autocast over fp32 weights) writes fp32's files: fp32 resumes them as they are, on
    another number of ranks too (ZeRO-0), exactly. From there a pipeline under ZeRO-1 converts and trains with
    autocast through DeepSpeed's pipeline engine, then DeepSpeed's own bf16 weights (ZeRO-2) take over."""
    run = tmp_path / "run"
    piece(tiny_dataset, run, 1, 3, "precision=bf16", "zero_stage=0")
    output = piece(tiny_dataset, run, 2, 3, "precision=fp32", "zero_stage=0")
    assert "written with" not in output and "at step 3" in output  # DeepSpeed's own load: no conversion
    assert_state_carried(run, 3)
    output = piece(tiny_dataset, run, 2, 3, "precision=bf16", "zero_stage=1", "parallel.pipeline_stages=2")
    assert converted(output, "step-00000006")
    assert_state_carried(run, 6)
    assert converted(piece(tiny_dataset, run, 2, 3, "precision=bf16-weights", "zero_stage=2"), "step-00000009")
    assert_state_carried(run, 9)
    assert_matches_reference(run, reference, rel=1e-3)


def _files(checkpoint: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(checkpoint.iterdir())}


def test_kill_9_during_a_conversion_leaves_the_original_and_the_rerun_converts(
    first_steps, reference: Path, tiny_dataset: Path, tmp_path: Path
) -> None:
    run = first_steps(2, tmp_path / "run")
    checkpoints = run / "checkpoints"
    original = _files(checkpoints / "step-00000004")
    killed = run_distributed(
        1,
        PROBE,
        *args(tiny_dataset, run, "train.steps_per_run=2", "zero_stage=2"),
        env={"PRETRAIN_FAULT": "kill_during_conversion:20"},
        check=False,
    )
    assert killed.returncode != 0 and "converting it to" in killed.stdout
    assert not (checkpoints / "step-00000004.portable.safetensors").exists()
    assert [p.name.split(".tmp-")[0] for p in checkpoints.glob(".*.tmp-*")] == [".step-00000004.portable.safetensors"]
    assert _files(checkpoints / "step-00000004") == original  # the original is untouched and still the latest
    assert (checkpoints / "latest").read_text().strip() == "step-00000004"
    # Ahead of time, as on a login node: one process, a progress bar; the killed one's leftover is removed.
    done = run_module("pretrain.convert_checkpoint", f"run_dir={run}", check=True)
    assert "wrote" in done.stdout and "converting step-00000004" in done.stderr  # tqdm draws on stderr
    portable = checkpoints / "step-00000004.portable.safetensors"
    assert portable.is_file() and not list(checkpoints.glob(".*.tmp-*"))
    converted_at = portable.stat().st_mtime_ns
    # The resume reuses it, and a checkpoint it writes is an ordinary one of its own layout.
    output = piece(tiny_dataset, run, 1, 2, "zero_stage=2")
    assert "(converted earlier)" in output and "converting it to" not in output
    assert portable.stat().st_mtime_ns == converted_at
    assert_state_carried(run, 4)
    assert sorted(p.name for p in (checkpoints / "step-00000006").glob("*optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    ]
    assert losses(run)[6] == pytest.approx(losses(reference)[6], rel=1e-4)


def test_what_cannot_continue_is_refused_at_start_up_before_any_conversion(
    first_steps, tiny_dataset: Path, tmp_path: Path
) -> None:
    run = first_steps(1, tmp_path / "run")
    done = run_module("pretrain", *args(tiny_dataset, run, "model.n_layer=3", "zero_stage=3"))
    assert done.returncode == 2
    assert "error: invalid config: model.n_layer=3: the run's latest checkpoint" in done.stderr
    assert "resume with model.n_layer=2, or start a new run_dir" in done.stderr
    # Back on 3 ranks: the global batch of 8 does not divide by micro batch 2 x 3 data-parallel ranks.
    done = run_distributed(3, "pretrain", *args(tiny_dataset, run, "zero_stage=3"), check=False)
    assert done.returncode != 0
    assert "error: invalid config: train.global_batch_size=8: must be a multiple of" in done.stderr
    assert "(3 = world size 3 / pipeline stages 1) = 6" in done.stderr
    assert "written with" not in done.stdout and "converting" not in done.stdout
    assert not list((run / "checkpoints").glob("*.portable.safetensors"))
    assert not list((run / "checkpoints").glob(".*.tmp-*"))
