"""Start-up validation: every problem in one line naming key and value, before any process group starts."""

from __future__ import annotations

from pathlib import Path

from tests.support import run_module


def test_all_problems_are_reported_at_once(tiny_dataset: Path, tmp_path: Path) -> None:
    done = run_module(
        "pretrain",
        f"data_dir={tiny_dataset}",
        f"run_dir={tmp_path}",
        "model.n_head=3",
        "model.d_model=64",
        "train.micro_batch_size=3",
        "train.global_batch_size=8",
        "model.max_seq_len=32",
        "model.vocab_size=999",
        "zero_stage=4",
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: invalid config:"), done.stderr
    for fragment in (
        "model.n_head=3: must divide model.d_model=64",
        "train.global_batch_size=8: must be a multiple of train.micro_batch_size (3)",
        "model.max_seq_len=32: is shorter than the dataset's seq_len (64)",
        "model.vocab_size=999: differs from the dataset's vocabulary (1024)",
        "zero_stage=4: must be 0, 1, 2 or 3",
    ):
        assert fragment in lines[0]
    assert not (tmp_path / "checkpoints").exists()


def test_missing_dataset_is_one_clear_line(tmp_path: Path) -> None:
    done = run_module("pretrain", f"data_dir={tmp_path / 'nowhere'}", f"run_dir={tmp_path / 'run'}")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: invalid config: data_dir={str(tmp_path / 'nowhere')!r}: holds no manifest.json: run python -m data_prep first"
    ]


def test_unknown_key_is_refused(tmp_path: Path) -> None:
    done = run_module("pretrain", f"run_dir={tmp_path}", "train.max_step=3")
    assert done.returncode != 0 and "max_step" in done.stderr and "Traceback" not in done.stderr


def test_generate_without_checkpoint_is_one_clear_line(tmp_path: Path) -> None:
    done = run_module("pretrain.generate", f"run_dir={tmp_path}", "prompt=hi")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: run_dir=")
