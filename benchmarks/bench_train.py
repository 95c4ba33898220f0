"""The trainer's own cost: `python -m pretrain` next to a bare PyTorch loop and transformers.Trainer.

    python benchmarks/bench_train.py [--models tiny,13.8M] [--precisions fp32,bf16] [--rounds 3] [--threads N]

Each system trains the same GPT shape on the same samples with the same hyper-parameters, as its own process
(1 process, ZeRO-0 for ours, micro batch 8, no dropout, no evaluation, no checkpoint in the timed steps):

* `python -m pretrain` (W&B and CodeCarbon off: their cost is at start-up, outside the timed steps);
* `bare`: an independently written plain PyTorch loop (benchmarks/train_peers.py, nothing imported from us);
* `hf`: transformers.Trainer on a GPT2LMHeadModel of the same shape (skipped, with a note, without
  transformers).

The machine is shared and noisy, so the systems run interleaved: every round runs each system once per
(model, precision), in an order rotated from round to round, so that load hits them alike. Speed is tokens
per second of wall-clock time over the steps after the first `--skip` (start-up, allocator and kernel
warm-up). Each round gives a ratio ours/bare and ours/hf; the median over rounds is the result. Targets:
>= 0.97 of the bare loop and ahead of (> 1.0) transformers.Trainer, in fp32 and in bf16.

Host memory: `python -m pretrain` keeps freed host memory for the next step (train.keep_host_memory, glibc malloc
settings; without them every step's tensors are fresh mappings faulted in page by page). The peers get the
same settings (train_peers.py --keep-host-memory), so the ratios measure the trainer's own cost against the
fastest loop, not an allocator setting; `--host-memory default` runs all three with glibc's defaults.

Precision: bf16 is torch.autocast over fp32 weights in all three: ours (`precision=bf16`, DeepSpeed's
`torch_autocast`), a plain loop, and Trainer's `bf16=True`. DeepSpeed's own bf16 (`precision=bf16-weights`: bf16
weights and activations, fp32 master weights) is another computation and not compared here.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PEERS = Path(__file__).resolve().parent / "train_peers.py"
# name: (n_layer, n_head, d_model). "tiny" is conf/model/tiny.yaml (the demo's model).
MODELS = {"tiny": (4, 4, 128), "13.8M": (6, 6, 384)}
STEPS = {"tiny": 80, "13.8M": 30}  # about the same wall time per run
LR, WARMUP, MICRO_BATCH = 6e-4, 10, 8


def prepare_data(path: Path) -> Path:
    if not (path / "manifest.json").is_file():
        subprocess.run(
            [sys.executable, "-m", "data_prep", "corpus=demo_books", f"output_dir={path}"], cwd=REPO, check=True
        )
    return path


def ours(
    data: Path, model: str, precision: str, steps: int, run_dir: Path, env: dict[str, str], keep: bool
) -> list[float]:
    n_layer, n_head, d_model = MODELS[model]
    command = [
        sys.executable,
        "-m",
        "pretrain",
        f"data_dir={data}",
        f"run_dir={run_dir}",
        "model=tiny",
        f"model.n_layer={n_layer}",
        f"model.n_head={n_head}",
        f"model.d_model={d_model}",
        f"train.max_steps={steps}",
        f"train.micro_batch_size={MICRO_BATCH}",
        f"train.global_batch_size={MICRO_BATCH}",
        f"train.lr={LR}",
        f"train.warmup_steps={WARMUP}",
        "train.log_interval=1",  # a metrics line per step: its time stamp is the step's end
        "eval.interval=0",
        "eval.at_end=false",
        "checkpoint.interval=0",
        "zero_stage=0",
        f"precision={precision}",
        "wandb.mode=disabled",
        "carbon.enabled=false",
        f"train.keep_host_memory={str(keep).lower()}",
    ]
    run(command, env)
    entries = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [e["time"] for e in entries if e["kind"] == "train"]


def peer(
    system: str, data: Path, model: str, precision: str, steps: int, env: dict[str, str], keep: bool
) -> list[float]:
    n_layer, n_head, d_model = MODELS[model]
    command = [sys.executable, str(PEERS), system, "--data", str(data), "--precision", precision]
    command += ["--keep-host-memory"] if keep else []
    command += ["--n-layer", str(n_layer), "--n-head", str(n_head), "--d-model", str(d_model)]
    command += ["--steps", str(steps), "--micro-batch", str(MICRO_BATCH), "--lr", str(LR), "--warmup", str(WARMUP)]
    return json.loads(run(command, env).strip().splitlines()[-1])["step_end_times"]


def run(command: list[str], env: dict[str, str]) -> str:
    """The command's stdout; its stderr's tail on failure."""
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"error: {' '.join(command[:4])} ... failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout


def tokens_per_second(step_ends: list[float], skip: int, seq_len: int) -> float:
    timed = step_ends[skip - 1 :]  # from the end of step `skip` to the end of the last step
    return (len(timed) - 1) * MICRO_BATCH * seq_len / (timed[-1] - timed[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,13.8M", help=f"comma-separated, of {sorted(MODELS)}")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps-scale", type=float, default=1.0, help="multiplies the steps per run")
    parser.add_argument("--skip", type=int, default=5, help="leading steps left out of the timing")
    parser.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS for every system (0: torch's)")
    parser.add_argument("--data", type=Path, default=Path.home() / ".cache" / "gpt-pretrain" / "bench-data")
    parser.add_argument(
        "--host-memory",
        choices=("keep", "default"),
        default="keep",
        help="keep: every system keeps freed host memory (ours' default); default: glibc's malloc defaults for all",
    )
    args = parser.parse_args()
    keep = args.host_memory == "keep"
    models = args.models.split(",")
    precisions = args.precisions.split(",")
    unknown = [m for m in models if m not in MODELS] + [p for p in precisions if p not in ("fp32", "bf16")]
    if unknown:
        parser.error(f"unknown model or precision {unknown}; models: {sorted(MODELS)}, precisions: fp32, bf16")
    data = prepare_data(args.data)
    seq_len = json.loads((data / "manifest.json").read_text())["seq_len"]
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    systems = ["ours", "bare"]
    missing = [name for name in ("transformers", "accelerate") if importlib.util.find_spec(name) is None]
    if not missing:
        systems.append("hf")
    else:
        print(
            f"note: {' and '.join(missing)} not installed: the transformers.Trainer peer is skipped "
            "(pip install 'transformers[torch]')"
        )
    rates: dict[tuple[str, str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as temp:
        for round_index in range(args.rounds):
            for model in models:
                steps = max(args.skip + 5, round(STEPS[model] * args.steps_scale))
                for precision in precisions:
                    shift = round_index % len(systems)
                    for system in systems[shift:] + systems[:shift]:
                        if system == "ours":
                            run_dir = Path(temp) / f"run-{round_index}-{model}-{precision}"
                            ends = ours(data, model, precision, steps, run_dir, env, keep)
                        else:
                            ends = peer(system, data, model, precision, steps, env, keep)
                        rate = tokens_per_second(ends, args.skip, seq_len)
                        rates.setdefault((model, precision, system), []).append(rate)
                        print(
                            f"  round {round_index + 1}/{args.rounds} {model:>6} {precision} {system:>4}: "
                            f"{rate:9,.0f} tokens/s",
                            flush=True,
                        )
    threads = args.threads or "torch's default"
    print(
        f"\nbench_train: 1 process, micro batch {MICRO_BATCH}, seq {seq_len}, {args.rounds} interleaved rounds, "
        f"threads {threads}, host memory {args.host_memory}, {os.cpu_count()} cores, load average {os.getloadavg()[1]:.1f} (5 min)"
    )
    header = f"{'model':>6} {'prec':>4} | {'ours tok/s':>10} {'bare tok/s':>10}"
    header += f" {'hf tok/s':>10} |" if "hf" in systems else " |"
    header += " ours/bare (target >= 0.97)" + ("  ours/hf (target > 1)" if "hf" in systems else "")
    print(header)
    for model in models:
        for precision in precisions:
            median = {s: statistics.median(rates[(model, precision, s)]) for s in systems}
            line = f"{model:>6} {precision:>4} | " + " ".join(f"{median[s]:10,.0f}" for s in systems) + " |"
            for peer_name in systems[1:]:
                pairs = zip(rates[(model, precision, "ours")], rates[(model, precision, peer_name)], strict=True)
                ratios = [o / p for o, p in pairs]
                spread = f"{min(ratios):.2f}-{max(ratios):.2f}"
                line += f" {statistics.median(ratios):6.3f} ({spread})    "
            print(line)


if __name__ == "__main__":
    main()
