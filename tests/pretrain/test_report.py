"""`python -m pretrain.report RUN` on a real run, rendered by a real headless Chromium (Debian's package)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.chromium import CHROMIUM, HEADLESS, require_chromium
from tests.support import run_distributed, run_module, tiny_run_args

CHARTS = ("loss", "lr", "throughput", "power", "emissions")


@pytest.fixture(scope="module")
def tracked_run(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One rank, 6 steps with evaluations and CodeCarbon on (W&B off: not what this module tests)."""
    run = tmp_path_factory.mktemp("tracked_run")
    run_distributed(
        1,
        "pretrain",
        *tiny_run_args(
            tiny_dataset,
            run,
            "train.lr=6e-4",
            "train.global_batch_size=4",
            "train.max_steps=6",
            "eval.interval=3",
            "eval.samples=8",
            "wandb.mode=disabled",
        ),
    )
    return run


def screenshot(page: Path, png: Path, profile: Path) -> subprocess.CompletedProcess[str]:
    require_chromium()
    return subprocess.run(
        [
            CHROMIUM,
            *HEADLESS,
            f"--user-data-dir={profile}",
            f"--screenshot={png}",
            "--window-size=1200,2000",
            page.resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_report_renders_in_headless_chromium(tracked_run: Path, tmp_path: Path) -> None:
    done = run_module("pretrain.report", str(tracked_run), check=True)
    page = tracked_run / "report" / "index.html"
    assert done.stdout.strip() == f"wrote {page}"
    for name in CHARTS:
        assert (tracked_run / "report" / f"{name}.png").read_bytes().startswith(b"\x89PNG")
    text = page.read_text()
    # Self-contained: every chart embedded, nothing fetched from anywhere.
    assert text.count('src="data:image/png;base64,') == len(CHARTS)
    assert "http://" not in text and "https://" not in text
    assert "kg CO2eq" in text and "best val loss" in text

    png = tmp_path / "screenshot.png"
    shot = screenshot(page, png, tmp_path / "chromium-profile")
    assert shot.returncode == 0 and png.is_file(), shot.stderr[-2000:]
    import matplotlib.image

    pixels = matplotlib.image.imread(png)[..., :3]  # (H, W, 3) floats in [0, 1]
    assert pixels.shape[:2] == (2000, 1200)
    assert pixels.std() > 0.05  # not a blank page
    # The charts themselves were drawn, not broken-image icons: the loss line's color (matplotlib's tab:blue)
    # and the emissions line's (tab:brown) are on screen.
    for rgb in ((0x1F, 0x77, 0xB4), (0x8C, 0x56, 0x4B)):
        close = np.abs(pixels * 255 - np.array(rgb)).max(axis=-1) < 12
        assert close.sum() > 150, rgb
    shutil.copy(png, tracked_run / "report" / "screenshot.png")  # for a person to look at


def test_missing_run_dir_is_one_clear_line(tmp_path: Path) -> None:
    done = run_module("pretrain.report", str(tmp_path / "nowhere"))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: run directory {str(tmp_path / 'nowhere')!r} does not exist: pass the run_dir of a training run"
    ]


def test_run_dir_without_metrics_is_one_clear_line(tmp_path: Path) -> None:
    done = run_module("pretrain.report", str(tmp_path))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "has no logged training step in metrics.jsonl" in lines[0]
