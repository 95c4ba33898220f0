"""Optimizer groups, the schedule and the generated DeepSpeed config."""

from __future__ import annotations

import pytest
import torch

from pretrain.core.config import RunConfig
from pretrain.core.engine import GuardedAdamW, deepspeed_config, lr_multiplier, parameter_groups
from pretrain.core.model import GPT
from pretrain.core.model_config import ModelConfig


def test_weight_decay_only_on_matrices() -> None:
    model = GPT(ModelConfig(vocab_size=50, n_layer=2, n_head=2, d_model=16, max_seq_len=8))
    decay, no_decay = parameter_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == sum(p.numel() for p in model.parameters())


def test_a_group_left_empty_is_dropped_so_the_schedule_has_one_lambda_per_group() -> None:
    # A pipeline stage holding only the tied embedding (partition_method=type:EmbeddingPipe) has matrices only.
    stage = torch.nn.Embedding(10, 4)
    groups = parameter_groups(stage, 0.1)
    assert [g["weight_decay"] for g in groups] == [0.1]
    optimizer = torch.optim.AdamW(groups, lr=1.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
    # What DeepSpeed does to the optimizer after the schedule was built: drop empty groups. Nothing to drop now.
    optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]
    stage(torch.tensor([1])).sum().backward()
    optimizer.step()
    schedule.step()  # failed with "zip() argument 2 is longer than argument 1" when an empty group was dropped
    assert schedule.get_last_lr() == [0.5]


def test_schedule_warms_up_then_decays_to_the_floor() -> None:
    values = [lr_multiplier(step, warmup=10, decay=90, min_ratio=0.1) for step in range(120)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(values[:10], values[1:10], strict=False))
    assert values[10] == pytest.approx(1.0)
    assert values[55] == pytest.approx(0.1 + 0.9 * 0.5, abs=1e-6)  # half-way through the cosine
    assert values[100] == pytest.approx(0.1) and values[119] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(values[10:], values[11:], strict=False))


def test_deepspeed_config_follows_the_run_config_and_passthrough() -> None:
    config = RunConfig(zero_stage=2, precision="bf16", deepspeed={"zero_optimization": {"overlap_comm": True}})
    config.train.global_batch_size, config.train.micro_batch_size = 64, 4
    generated = deepspeed_config(config, data_parallel_size=4)
    assert generated["gradient_accumulation_steps"] == 4 and generated["train_batch_size"] == 64
    assert generated["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    assert generated["bf16"]["enabled"] and not generated["fp16"]["enabled"]


def test_guarded_adamw_skips_a_non_finite_step_and_reports_the_norm() -> None:
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = GuardedAdamW([weight], max_norm=1.0, lr=0.1)
    weight.grad = torch.tensor([3.0, 4.0, 0.0])
    optimizer.step()
    assert optimizer._global_grad_norm == pytest.approx(5.0) and not optimizer.overflow
    assert not torch.equal(weight.detach(), torch.ones(3))
    before, moments = weight.detach().clone(), optimizer.state[weight]["exp_avg"].clone()
    weight.grad = torch.tensor([float("nan"), 1.0, 1.0])
    optimizer.step()
    assert optimizer.overflow
    assert torch.equal(weight.detach(), before) and torch.equal(optimizer.state[weight]["exp_avg"], moments)
