"""Trainer overhead: `python -m pretrain` next to a bare PyTorch loop, same model, data, batch, machine, run.

    python benchmarks/bench_train.py [--model tiny] [--steps 60] [--micro-batch 8] [--data DIR]

Prints tokens/s of (a) `python -m pretrain` (1 process, ZeRO-0, fp32), (b) a bare loop (the same GPT class,
torch AdamW, no DeepSpeed, the same batches), their ratio (target >= 0.95), (c) the data loader alone (target:
>= 20x the trainer), model FLOPs per token and achieved FLOP/s. Without --data, the demo corpus is prepared
once into ~/.cache/gpt-pretrain/bench-data.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_prep.manifest import load_manifest  # noqa: E402
from pretrain.core.config import RunConfig  # noqa: E402
from pretrain.core.data import BatchLayout, TokenSamples, build_index, train_loader  # noqa: E402
from pretrain.core.engine import lr_multiplier, parameter_groups  # noqa: E402
from pretrain.core.model import GPT  # noqa: E402
from pretrain.core.model_config import ModelConfig  # noqa: E402


def prepare_data(path: Path) -> Path:
    if not (path / "manifest.json").is_file():
        subprocess.run(
            [sys.executable, "-m", "data_prep", "corpus=demo_books", f"output_dir={path}"], cwd=REPO, check=True
        )
    return path


def model_config(name: str, vocab_size: int) -> ModelConfig:
    from omegaconf import OmegaConf

    preset = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "model" / f"{name}.yaml"))
    return ModelConfig(**{**preset, "vocab_size": vocab_size})  # type: ignore[arg-type]


def framework(data: Path, args: argparse.Namespace, run_dir: Path) -> float:
    command = [
        sys.executable,
        "-m",
        "pretrain",
        f"data_dir={data}",
        f"run_dir={run_dir}",
        f"model={args.model}",
        f"train.max_steps={args.steps}",
        f"train.micro_batch_size={args.micro_batch}",
        f"train.global_batch_size={args.micro_batch}",
        f"train.log_interval={args.steps // 4}",
        "train.warmup_steps=10",
        "eval.interval=0",
        "eval.at_end=false",
        "checkpoint.interval=0",
        "zero_stage=0",
        "precision=fp32",
    ]
    subprocess.run(command, cwd=REPO, check=True, capture_output=True, text=True)
    entries = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [e["tokens_per_second"] for e in entries if e["kind"] == "train"]
    return sum(rates[1:]) / len(rates[1:])  # the first interval holds the warm-up


def bare_loop(data: Path, args: argparse.Namespace, cache: Path) -> tuple[float, float]:
    """Returns (tokens/s of the bare loop, FLOPs per token)."""
    manifest = load_manifest(data)
    config = model_config(args.model, manifest.vocab_size)
    defaults = RunConfig().train
    torch.manual_seed(1234)
    model = GPT(config)
    optimizer = torch.optim.AdamW(
        parameter_groups(model, defaults.weight_decay), lr=defaults.lr, betas=(defaults.beta1, defaults.beta2)
    )
    dataset = TokenSamples(build_index(data, manifest, "train", cache), manifest.seq_len)
    loader = iter(train_loader(dataset, BatchLayout(args.micro_batch, 1, 1, 0), 1234, 0, defaults.num_workers, False))
    seconds, tokens = 0.0, 0
    for step in range(args.steps):
        started = time.perf_counter()
        batch = next(loader)
        for group in optimizer.param_groups:
            group["lr"] = defaults.lr * lr_multiplier(step, 10, args.steps, defaults.min_lr_ratio)
        loss = model(batch["input_ids"], batch["targets"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), defaults.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= args.steps // 4:  # skip the same warm-up share as the framework's first interval
            seconds += time.perf_counter() - started
            tokens += args.micro_batch * manifest.seq_len
    return tokens / seconds, config.flops_per_token(manifest.vocab_size, manifest.seq_len)


def loader_alone(data: Path, args: argparse.Namespace, cache: Path, batches: int = 400) -> float:
    manifest = load_manifest(data)
    dataset = TokenSamples(build_index(data, manifest, "train", cache), manifest.seq_len)
    loader = iter(train_loader(dataset, BatchLayout(args.micro_batch, 1, 1, 0), 1234, 0, 2, False))
    next(loader)
    started = time.perf_counter()
    for _ in range(batches):
        next(loader)
    return batches * args.micro_batch * manifest.seq_len / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--data", type=Path, default=Path.home() / ".cache" / "gpt-pretrain" / "bench-data")
    args = parser.parse_args()
    data = prepare_data(args.data)
    with tempfile.TemporaryDirectory() as temp:
        run_dir = Path(temp) / "run"
        framework_rate = framework(data, args, run_dir)
        bare_rate, flops_per_token = bare_loop(data, args, Path(temp) / "cache")
        loader_rate = loader_alone(data, args, Path(temp) / "cache")
    print(
        f"bench_train: model {args.model}, micro-batch {args.micro_batch}, {args.steps} steps, fp32, CPU threads "
        f"{torch.get_num_threads()}, {os.cpu_count()} cores"
    )
    print(f"  model FLOPs per token             {flops_per_token / 1e6:12.2f} MFLOP")
    print(
        f"  python -m pretrain (ZeRO-0)       {framework_rate:12,.0f} tokens/s  {framework_rate * flops_per_token / 1e9:8.2f} GFLOP/s"
    )
    print(
        f"  bare PyTorch loop                 {bare_rate:12,.0f} tokens/s  {bare_rate * flops_per_token / 1e9:8.2f} GFLOP/s"
    )
    print(f"  ratio framework / bare            {framework_rate / bare_rate:12.3f}   (target >= 0.95)")
    print(f"  data loader alone (2 workers)     {loader_rate:12,.0f} tokens/s")
    print(f"  ratio loader / framework          {loader_rate / framework_rate:12.1f}x  (target >= 20x)")


if __name__ == "__main__":
    main()
