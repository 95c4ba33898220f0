"""Pipeline parallelism and activation checkpointing, measured side by side in one run.

    python benchmarks/bench_pipeline.py [--steps 20] [--data DIR]

On 2 ranks (CPU gloo ranks here; GPUs where present) at the same global batch: tokens/s and peak memory per
rank of 2 pipeline stages (P=2, ZeRO-1) next to 2 data-parallel replicas (P=1, ZeRO-1); then, on one rank,
peak memory with and without activation checkpointing. Peak memory is the CUDA allocator's peak on GPUs and
the process' max RSS on CPU (which includes ~0.5 GB of libraries, so compare differences there).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Big enough that activations matter next to the libraries' resident memory.
MODEL = ("model=tiny", "model.n_layer=8", "model.n_head=4", "model.d_model=256", "model.max_seq_len=256")


def run(data: Path, run_dir: Path, ranks: int, steps: int, *extra: str) -> dict[str, float]:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
        "-m", "pretrain", f"data_dir={data}", f"run_dir={run_dir}", *MODEL,
        f"train.max_steps={steps}", "train.micro_batch_size=4", "train.global_batch_size=32",
        f"train.log_interval={max(1, steps // 4)}", "train.warmup_steps=5", "train.num_workers=1",
        "eval.interval=0", "eval.at_end=false", "checkpoint.interval=0", "carbon.enabled=false",
        "wandb.mode=disabled", *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // ranks))}
    subprocess.run(command, cwd=REPO, check=True, capture_output=True, text=True, env=env)
    entries = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [e for e in entries if e["kind"] == "train"]
    rates = [e["tokens_per_second"] for e in train[1:]]  # the first interval holds the warm-up
    return {"tokens_per_second": sum(rates) / len(rates), "peak_memory_mb": max(e["peak_memory_mb"] for e in train)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--data", type=Path, default=Path.home() / ".cache" / "gpt-pretrain" / "bench-data")
    args = parser.parse_args()
    if not (args.data / "manifest.json").is_file():
        subprocess.run(
            [sys.executable, "-m", "data_prep", "corpus=demo_books", f"output_dir={args.data}"], cwd=REPO, check=True
        )
    with tempfile.TemporaryDirectory() as temp:
        root = Path(temp)
        data_parallel = run(args.data, root / "dp", 2, args.steps, "zero_stage=1")
        pipeline = run(args.data, root / "pp", 2, args.steps, "zero_stage=1", "parallel.pipeline_stages=2")
        plain = run(args.data, root / "plain", 1, args.steps, "zero_stage=0")
        checkpointed = run(args.data, root / "ac", 1, args.steps, "zero_stage=0", "activation_checkpointing=true")
    print(f"bench_pipeline: 8 layers x 256 wide, seq 256, global batch 32 (micro 4), {args.steps} steps")
    print(f"  {'layout':<38}{'tokens/s':>12}{'peak MB/rank':>14}")
    for name, figures in (
        ("2 ranks, data parallel (P=1, ZeRO-1)", data_parallel),
        ("2 ranks, pipeline (P=2, ZeRO-1)", pipeline),
        ("1 rank, no activation checkpointing", plain),
        ("1 rank, activation checkpointing", checkpointed),
    ):
        print(f"  {name:<38}{figures['tokens_per_second']:>12,.0f}{figures['peak_memory_mb']:>14,.0f}")
    print(
        f"  pipeline / data parallel: tokens/s x{pipeline['tokens_per_second'] / data_parallel['tokens_per_second']:.2f}, "
        f"peak memory x{pipeline['peak_memory_mb'] / data_parallel['peak_memory_mb']:.2f}"
    )
    print(
        f"  activation checkpointing: tokens/s x{checkpointed['tokens_per_second'] / plain['tokens_per_second']:.2f}, "
        f"peak memory {checkpointed['peak_memory_mb'] - plain['peak_memory_mb']:+,.0f} MB"
    )


if __name__ == "__main__":
    main()
