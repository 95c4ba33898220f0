"""Optimizer groups, the schedule and the generated DeepSpeed config."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from pretrain.core.config import RunConfig
from pretrain.core.engine import GuardedAdamW, adamw_settings, deepspeed_config, lr_multiplier, parameter_groups
from pretrain.core.model import GPT
from pretrain.core.model_config import ModelConfig
from tests.support import REPO


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
    config = RunConfig(zero_stage=2, precision="bf16-weights", deepspeed={"zero_optimization": {"overlap_comm": True}})
    config.train.global_batch_size, config.train.micro_batch_size = 64, 4
    generated = deepspeed_config(config, data_parallel_size=4)
    assert generated["gradient_accumulation_steps"] == 4 and generated["train_batch_size"] == 64
    assert generated["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    assert generated["bf16"]["enabled"] and not generated["fp16"]["enabled"]
    assert not generated["torch_autocast"]["enabled"]


def test_bf16_is_torch_autocast_over_fp32_weights_with_fp32_gradient_reductions() -> None:
    generated = deepspeed_config(RunConfig(zero_stage=1, precision="bf16"), data_parallel_size=2)
    assert not generated["bf16"]["enabled"] and not generated["fp16"]["enabled"]
    assert generated["torch_autocast"] == {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    # The deepspeed key can still have Linear gradients reduced in bf16 (DeepSpeed's default under autocast).
    linear = {"torch_autocast": {"lower_precision_safe_modules": ["torch.nn.Linear"]}}
    generated = deepspeed_config(RunConfig(precision="bf16", deepspeed=linear), data_parallel_size=2)
    assert generated["torch_autocast"]["enabled"] and generated["torch_autocast"]["lower_precision_safe_modules"]


def test_bf16_trains_like_a_plain_autocast_loop() -> None:
    """precision=bf16 at ZeRO-0 on one rank: the same losses and weights, bit for bit, as a plain loop with
    torch.autocast(bfloat16) over fp32 weights, fused AdamW, clip_grad_norm_ and LambdaLR; the matrix products run
    in bf16 (and so the losses differ from fp32's) while every weight stays fp32."""
    script = textwrap.dedent(
        """
        import copy, torch
        from pretrain.core.config import RunConfig
        from pretrain.core.distributed import init_distributed
        from pretrain.core.engine import GuardedAdamW, build_train_step, lr_multiplier, parameter_groups
        from pretrain.core.model import GPT
        from pretrain.core.model_config import ModelConfig

        init_distributed()
        model_config = ModelConfig(vocab_size=64, n_layer=2, n_head=2, d_model=32, max_seq_len=16)
        torch.manual_seed(0)
        initial = GPT(model_config)
        tokens = torch.randint(0, 64, (4, 4, 17), generator=torch.Generator().manual_seed(1))
        batches = [{"input_ids": t[:, :-1], "targets": t[:, 1:], "indices": torch.arange(4)} for t in tokens]

        def ours(precision):
            config = RunConfig(precision=precision, zero_stage=0)
            config.model = model_config
            config.train.micro_batch_size = config.train.global_batch_size = 4
            config.train.warmup_steps, config.train.max_steps = 2, 4
            step = build_train_step(copy.deepcopy(initial), config, 1, 0, torch.device("cpu"), 16)
            assert isinstance(step.engine.optimizer, GuardedAdamW), type(step.engine.optimizer)
            seen = []
            step.engine.module.blocks[0].mlp.fc.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
            losses = [float(step.train(iter([batch]), [])) for batch in batches]
            assert all(p.dtype == torch.float32 for p in step.engine.module.parameters())
            return losses, [p.detach() for p in step.engine.module.parameters()], set(seen)

        model = copy.deepcopy(initial)
        optimizer = torch.optim.AdamW(parameter_groups(model, 0.1), lr=6e-4, betas=(0.9, 0.95), fused=True)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, 2, 2, 0.1))
        plain = []
        for batch in batches:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(batch["input_ids"], batch["targets"])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
            plain.append(float(loss))
        losses, weights, dtypes = ours("bf16")
        assert dtypes == {torch.bfloat16}, dtypes
        assert losses == plain, (losses, plain)
        assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters())), "weights differ"
        fp32_losses, _, fp32_dtypes = ours("fp32")
        assert fp32_dtypes == {torch.float32} and fp32_losses != losses
        assert all(abs(a - b) < 0.02 * a for a, b in zip(fp32_losses, losses)), (fp32_losses, losses)
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


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


def test_adamw_is_fused_on_cpu_and_the_guard_still_clips_and_skips() -> None:
    """The fused CPU kernel (fix for a 130 ms per-parameter loop on the 13.8 M model) gives the loop's weights
    to float rounding, with GuardedAdamW's clipping and non-finite skip unchanged."""
    settings = adamw_settings(RunConfig().train, torch.device("cpu"))
    assert settings["fused"] is True
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=50, n_layer=2, n_head=2, d_model=16, max_seq_len=8))
    fused_weights = [p.detach().clone().requires_grad_() for p in model.parameters()]
    loop_weights = [p.detach().clone().requires_grad_() for p in model.parameters()]
    fused = GuardedAdamW(fused_weights, max_norm=1.0, **settings)
    loop = GuardedAdamW(loop_weights, max_norm=1.0, **{**settings, "fused": False})
    generator = torch.Generator().manual_seed(1)
    for step in range(6):
        grads = [torch.randn(p.shape, generator=generator) * 3 for p in fused_weights]
        if step == 3:
            grads[0][0] = float("inf")
        for optimizer, weights in ((fused, fused_weights), (loop, loop_weights)):
            for weight, grad in zip(weights, grads, strict=True):
                weight.grad = grad.clone()
            optimizer.step()
        assert fused.overflow == loop.overflow == (step == 3)
        assert fused._global_grad_norm == pytest.approx(loop._global_grad_norm, rel=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(fused_weights, loop_weights, strict=True))
    assert all(not torch.equal(a, p) for a, p in zip(fused_weights, model.parameters(), strict=True))
