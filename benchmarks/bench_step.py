"""The trainer's step against a bare step, paired step by step in one process (CPU time).

    python benchmarks/bench_step.py [--model tiny|13.8M] [--steps 20] [--threads 1]
        [--systems ours-fp32,bare-fp32,ours-bf16,bare-bf16,ours-bf16-weights] [--profile ours-bf16-weights]

Whole processes (bench_train.py) on a shared machine vary by tens of percent from run to run; a few percent
of overhead shows only when both systems see the same load. Here every system is built in this process on its
own copy of the same initial weights: `ours-<precision>` is the trainer's step object (engine.py's
build_train_step: the real DeepSpeed engine, one gloo rank, ZeRO-0, micro batch 8) and `bare-<precision>` a
plain loop on the project's GPT (fused AdamW, clip_grad_norm_, LambdaLR; bf16: torch.autocast). Steps take
turns, the order rotating, and each step's process CPU time is recorded: with one intra-op thread (the
default here) CPU time is the work done, hardly touched by load. Printed: the median CPU ms per step, and
the median over paired steps of bare/ours (speed of ours relative to the bare loop: target >= 0.97).
`--profile SYSTEM` adds torch.profiler's table over 4 more steps of that system.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODELS = {"tiny": (4, 4, 128), "13.8M": (6, 6, 384)}  # (n_layer, n_head, d_model)
VOCAB, SEQ, MICRO_BATCH, SKIP = 8192, 256, 8, 3


def batches(seed: int = 1) -> Iterator[dict[str, torch.Tensor]]:
    """The same 16 random batches, cycled, for every system."""
    tokens = torch.randint(0, VOCAB, (16, MICRO_BATCH, SEQ + 1), generator=torch.Generator().manual_seed(seed))
    while True:
        for t in tokens:
            yield {"input_ids": t[:, :-1], "targets": t[:, 1:], "indices": torch.arange(MICRO_BATCH)}


def build(system: str, initial: torch.nn.Module, model_config) -> Callable[[], float]:
    from pretrain.core.config import RunConfig
    from pretrain.core.engine import adamw_settings, build_train_step, lr_multiplier, parameter_groups

    kind, precision = system.split("-", 1)
    config = RunConfig(precision=precision, zero_stage=0)
    config.model = model_config
    config.train.micro_batch_size = config.train.global_batch_size = MICRO_BATCH
    config.train.warmup_steps, config.train.max_steps = 10, 1000
    model, data = copy.deepcopy(initial), batches()
    if kind == "ours":
        step = build_train_step(model, config, 1, 0, torch.device("cpu"), SEQ)
        return lambda: float(step.train(data, []))
    optimizer = torch.optim.AdamW(parameter_groups(model, 0.1), **adamw_settings(config.train, torch.device("cpu")))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, 10, 990, 0.1))

    def bare() -> float:
        batch = next(data)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(batch["input_ids"], batch["targets"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        return float(loss.detach())

    return bare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--steps", type=int, default=20, help="steps per system, the first 3 not counted")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--systems", default="ours-fp32,bare-fp32,ours-bf16,bare-bf16,ours-bf16-weights")
    parser.add_argument("--profile", default="", help="a system to profile after the timed steps")
    parser.add_argument(
        "--host-memory", choices=("keep", "default"), default="keep", help="as train.keep_host_memory (all systems)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from pretrain.core.distributed import init_distributed
    from pretrain.core.host_memory import keep_freed_host_memory

    if args.host_memory == "keep":  # as `python -m pretrain` starts; one process: the same for every system
        keep_freed_host_memory()
    from pretrain.core.model import GPT
    from pretrain.core.model_config import ModelConfig

    init_distributed()  # one gloo rank, as `python -m pretrain` starts it
    n_layer, n_head, d_model = MODELS[args.model]
    model_config = ModelConfig(n_layer=n_layer, n_head=n_head, d_model=d_model, vocab_size=VOCAB, max_seq_len=SEQ)
    torch.manual_seed(0)
    initial = GPT(model_config)
    systems = args.systems.split(",")
    steps = {system: build(system, initial, model_config) for system in systems}
    cpu: dict[str, list[float]] = {system: [] for system in systems}
    losses: dict[str, float] = {}
    for i in range(args.steps):
        for system in systems[i % len(systems) :] + systems[: i % len(systems)]:
            started = time.process_time()
            losses[system] = steps[system]()
            cpu[system].append(time.process_time() - started)
    print(
        f"bench_step: {args.model}, micro batch {MICRO_BATCH} x {SEQ}, {args.threads} thread(s), "
        f"{args.steps - SKIP} paired steps, load average {os.getloadavg()[0]:.1f}"
    )
    print(f"{'system':>18} | {'CPU ms/step':>11} | {'bare/ours':>9} | loss at the last step")
    for system in systems:
        kind, precision = system.split("-", 1)
        bare = f"bare-{precision}"
        ratio = ""
        if kind == "ours" and bare in cpu:
            pairs = zip(cpu[system][SKIP:], cpu[bare][SKIP:], strict=True)
            ratio = f"{statistics.median(b / o for o, b in pairs):9.3f}"
        print(
            f"{system:>18} | {1000 * statistics.median(cpu[system][SKIP:]):11.0f} | {ratio:>9} | {losses[system]:.6f}"
        )
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as trace:
            for _ in range(4):
                steps[args.profile]()
        print(trace.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
