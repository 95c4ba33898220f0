"""Trainer overhead: `python -m pretrain` next to a bare PyTorch loop, same model, data, batch, machine, run.

    python benchmarks/bench_train.py [--model tiny] [--steps 60] [--micro-batch 8] [--data DIR]

Prints tokens/s of (a) `python -m pretrain` (1 process, ZeRO-0, fp32), (b) a bare loop (the same GPT class,
torch AdamW, no DeepSpeed, the same batches), their ratio (target >= 0.95), (c) the data loader alone (target:
>= 20x the trainer), model FLOPs per token and achieved FLOP/s, (d) a two-source data mixture against one
source (`mixture_overhead`: target < 2% of step time, and its loader alone still >= 20x the trainer). Without
--data, the demo corpus is prepared once into ~/.cache/gpt-pretrain/bench-data (and a second source from 4 of
its books with the same tokenizer into bench-data-b).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_prep.manifest import load_manifest  # noqa: E402
from pretrain.core.config import RunConfig  # noqa: E402
from pretrain.core.data import BatchLayout, CursorSampler, TokenSamples, build_index, open_sources, train_loader  # noqa: E402
from pretrain.core.engine import lr_multiplier, parameter_groups  # noqa: E402
from pretrain.core.mixture import DataSources  # noqa: E402
from pretrain.core.model import GPT  # noqa: E402
from pretrain.core.model_config import ModelConfig  # noqa: E402
from pretrain.core.sample_order import GlobalOrder  # noqa: E402


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


def framework(data_args: list[str], args: argparse.Namespace, run_dir: Path) -> float:
    """tokens/s of `python -m pretrain` (1 process, ZeRO-0, fp32) on the datasets `data_args` name."""
    command = [sys.executable, "-m", "pretrain", *data_args, f"run_dir={run_dir}", f"model={args.model}"]
    command += [f"train.max_steps={args.steps}", f"train.micro_batch_size={args.micro_batch}"]
    command += [f"train.global_batch_size={args.micro_batch}", f"train.log_interval={args.steps // 4}"]
    command += ["train.warmup_steps=10", "eval.interval=0", "eval.at_end=false", "checkpoint.interval=0"]
    command += ["zero_stage=0", "precision=fp32"]
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


# ----------------------------------------------------------------------------------------- data mixtures
MIXTURE_BOOKS = ("shakespeare-*.txt", "blake-poems.txt")  # the second source: a few books of the demo corpus


def prepare_second_source(data: Path) -> Path:
    """A second source for the mixture: a few books of the demo corpus, with `data`'s tokenizer and seq_len."""
    target = data.with_name(data.name + "-b")
    if not (target / "manifest.json").is_file():
        from omegaconf import OmegaConf

        from data_prep.config import CorpusConfig
        from data_prep.corpus import fetch_corpus

        loaded = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "corpus" / "demo_books.yaml").corpus)
        corpus = fetch_corpus(CorpusConfig(**loaded))  # type: ignore[arg-type]
        books = [str(path) for pattern in MIXTURE_BOOKS for path in sorted(corpus.glob(pattern))]
        seq_len = load_manifest(data).seq_len
        command = [sys.executable, "-m", "data_prep", f"input=[{','.join(books)}]", f"output_dir={target}"]
        command += [f"seq_len={seq_len}", f"tokenizer.model_path={data / 'tokenizer.model'}"]
        command += ["val_fraction=0.05"]  # 4 books: the default 1% is less than one validation sample
        subprocess.run(command, cwd=REPO, check=True)
    return target


def sampler_seconds_per_sample(order: Callable[[int], int], samples: int) -> float:
    """CPU seconds per sample the data loader's sampler spends finding the next sample in `order`."""
    sampler = iter(CursorSampler(order, BatchLayout(8, 1, 1, 0), 1_000_000))  # far into the run: O(1) anyway
    started = time.process_time()
    for _ in range(samples):
        next(sampler)
    return (time.process_time() - started) / samples


def mixture_overhead(data: Path, args: argparse.Namespace, temp: Path, rounds: int = 2) -> None:
    """A mixture of `data` and a second source (0.7 / 0.3) against `data` alone, printed side by side.

    What a mixture adds to a step is the sampler's lookups (which source, then that source's permutation) and
    one bincount per log interval for tokens/<source>; reading a sample is the same pread. That cost is measured
    in CPU time per sample (stable on a shared machine) and put against the trainer's step time; the end-to-end
    rates of `python -m pretrain` on one source and on the mixture, interleaved `rounds` times, are printed too
    (wall-clock: noisy on a shared machine)."""
    second = prepare_second_source(data)
    config = RunConfig(data_dirs=[str(data), str(second)], data_weights=[0.7, 0.3])
    sources = DataSources.from_config(config)
    sources.problems().raise_if_any()
    sources.begin(config.seed)
    samples = 200_000
    single = sampler_seconds_per_sample(GlobalOrder(sources.sources[0].train_samples, config.seed), samples)
    mixed = sampler_seconds_per_sample(sources.order(), samples)
    seq_len = sources.manifest.seq_len

    # The loader alone on the mixture (2 workers), as loader_alone measures one source.
    train, _ = open_sources(sources, temp / "cache-mixture")
    loader = iter(train_loader(train, BatchLayout(args.micro_batch, 1, 1, 0), 1234, 0, 2, False, order=sources.order()))
    next(loader)
    started = time.perf_counter()
    for _ in range(400):
        next(loader)
    loader_rate = 400 * args.micro_batch * seq_len / (time.perf_counter() - started)

    rates: dict[str, list[float]] = {"one source": [], "mixture": []}
    for round_index in range(rounds):
        for name, data_args in (
            ("one source", [f"data_dir={data}"]),
            ("mixture", [f"data_dirs=[{data},{second}]", "data_weights=[0.7,0.3]"]),
        ):
            rates[name].append(framework(data_args, args, temp / f"run-{name.replace(' ', '-')}-{round_index}"))
    one, mix = (sum(r) / len(r) for r in rates.values())
    step_seconds = args.micro_batch * seq_len / one
    added = (mixed - single) * args.micro_batch
    print(f"  data mixture: {data.name} 0.7 + {second.name} 0.3 ({sources.sources[1].train_samples:,} samples)")
    print(f"    sampler, one source / mixture   {single * 1e6:9.2f} / {mixed * 1e6:.2f} µs CPU per sample")
    print(
        f"    added per step / step time      {added * 1e3:9.3f} ms / {step_seconds * 1e3:.1f} ms = {added / step_seconds:.4%}  (target < 2%)"
    )
    print(
        f"    python -m pretrain, one source  {one:12,.0f} tokens/s  (runs: {', '.join(f'{r:,.0f}' for r in rates['one source'])})"
    )
    print(
        f"    python -m pretrain, mixture     {mix:12,.0f} tokens/s  (runs: {', '.join(f'{r:,.0f}' for r in rates['mixture'])})"
    )
    print(f"    ratio mixture / one source      {mix / one:12.3f}   (wall-clock, interleaved {rounds}x)")
    print(
        f"    mixture loader alone            {loader_rate:12,.0f} tokens/s = {loader_rate / mix:.1f}x the trainer  (target >= 20x)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--data", type=Path, default=Path.home() / ".cache" / "gpt-pretrain" / "bench-data")
    parser.add_argument("--no-mixture", dest="mixture", action="store_false", help="skip the data-mixture section")
    args = parser.parse_args()
    data = prepare_data(args.data)
    with tempfile.TemporaryDirectory() as temp:
        run_dir = Path(temp) / "run"
        framework_rate = framework([f"data_dir={data}"], args, run_dir)
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
    if args.mixture:
        with tempfile.TemporaryDirectory() as temp:
            mixture_overhead(data, args, Path(temp))


if __name__ == "__main__":
    main()
