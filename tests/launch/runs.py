"""What the launch tests share: a small, fast training run and readers of what a run leaves behind."""

from __future__ import annotations

import json
from pathlib import Path

from data_prep.manifest import load_manifest
from pretrain.core.callbacks.metrics_file import read_metrics
from pretrain.core.data import GlobalOrder
from tests.support import TINY_RUN

GLOBAL_BATCH = 8
# A small model and 8-sample steps; no tracking, so that a run is mostly start-up.
SMALL = (
    *TINY_RUN,
    "train.lr=6e-4",
    f"train.global_batch_size={GLOBAL_BATCH}",
    "eval.samples=16",
    "wandb.mode=disabled",
    "carbon.enabled=false",
)


def train_entries(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [e for e in read_metrics(path) if e["kind"] == "train"] if path.is_file() else []


def train_steps(run: Path) -> list[int]:
    return [e["step"] for e in train_entries(run)]


def assert_every_sample_once(run: Path, data: Path, steps: int) -> None:
    """Each step traced once (nothing redone after a restart), with exactly the global order's samples of that
    step: nothing repeated, nothing skipped, whatever stopped and resumed the run."""
    consumed: dict[int, list[int]] = {}
    for trace in run.glob("samples-rank*.jsonl"):
        for line in trace.read_text().splitlines():
            entry = json.loads(line)
            assert entry["samples"], entry
            consumed.setdefault(entry["step"], []).extend(entry["samples"])
    assert sorted(consumed) == list(range(1, steps + 1))
    order = GlobalOrder(load_manifest(data).splits["train"].samples, seed=1234)
    for step, samples in consumed.items():
        expected = [order(p) for p in range((step - 1) * GLOBAL_BATCH, step * GLOBAL_BATCH)]
        assert sorted(samples) == sorted(expected), step


def assert_rank_environment(run: Path, nodes: int, per_node: int) -> None:
    """What every launcher must give each rank (written by tests/launch/rank_env.py)."""
    envs = [json.loads(p.read_text()) for p in sorted(run.glob("env-rank*.json"))]
    world = nodes * per_node
    assert sorted(int(env["RANK"]) for env in envs) == list(range(world)), envs
    for env in envs:
        assert env["WORLD_SIZE"] == str(world) and env["LOCAL_WORLD_SIZE"] == str(per_node), env
        assert 0 <= int(env["LOCAL_RANK"]) < per_node, env
        assert env["MASTER_ADDR"] and env["MASTER_PORT"], env
    # One rendezvous: every rank knows the same master.
    assert len({(env["MASTER_ADDR"], env["MASTER_PORT"]) for env in envs}) == 1, envs
    assert sorted(int(env["LOCAL_RANK"]) for env in envs) == sorted(list(range(per_node)) * nodes), envs
