"""What a resume on another layout costs, for a gpt2-small checkpoint (124 M parameters) written by 2 CPU ranks.

    python benchmarks/bench_reshard.py [--zero 2] [--keep DIR]

Side by side, on the same checkpoint (ZeRO-2 over 2 data-parallel ranks, AdamW state after one step):
  - the save that wrote it (pretrain/core/checkpoint.py: DeepSpeed's save_checkpoint on 2 ranks + commit);
  - our conversion to the portable form (one process, no engine): wall time, peak RSS and peak anonymous
    memory (RSS counts the checkpoint's pages it reads through a memory map; those belong to the page cache);
  - DeepSpeed's own converter to its universal format (`ds_to_universal`, 2 workers), the library's fastest
    way to do the same work;
  - loading on 2 ranks: DeepSpeed's native load into the same layout, against loading the portable form into
    ZeRO-3 (another layout).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SEQ = 128


def _run_config(zero_stage: int) -> Any:
    from pretrain.core.config import RunConfig
    from pretrain.core.model_config import ModelConfig

    config = RunConfig(zero_stage=zero_stage)
    config.model = ModelConfig(name="gpt2-small", vocab_size=50257, n_layer=12, n_head=12, d_model=768)
    config.train.micro_batch_size, config.train.global_batch_size, config.train.max_steps = 1, 2, 100
    return config


def _engine(config: Any) -> tuple[Any, Any]:
    import torch

    from pretrain.core.distributed import init_distributed
    from pretrain.core.engine import build_engine
    from pretrain.core.model import GPT

    world = init_distributed()
    torch.manual_seed(0)
    engine, _ = build_engine(GPT(config.model), config, config.data_parallel_size(world.world_size), world.device)
    return engine, world


def worker_save(root: Path, zero_stage: int) -> None:
    """On every rank: one training step, then the project's save; rank 0 prints the save's seconds."""
    from dataclasses import asdict

    import torch

    from common.app import to_container
    from pretrain.core.checkpoint import Checkpointer
    from pretrain.core.distributed import barrier
    from pretrain.core.run_dir import RunDir

    config = _run_config(zero_stage)
    engine, world = _engine(config)
    tokens = torch.randint(0, 50257, (1, SEQ + 1), generator=torch.Generator().manual_seed(world.rank))
    loss = engine(tokens[:, :-1], tokens[:, 1:])
    engine.backward(loss)
    engine.step()
    state = {
        "trainer": {"step": 1},
        "world_size": world.world_size,
        "zero_stage": zero_stage,
        "pipeline_stages": 1,
        "config": to_container(config),
        "model": asdict(config.model),
        "seq_len": SEQ,
    }
    checkpointer = Checkpointer(RunDir(root), keep_last=3, world=world)
    barrier()
    started = time.perf_counter()
    checkpointer.save(engine, 1, state, b"tokenizer")
    seconds = time.perf_counter() - started
    if world.is_main:
        print(json.dumps({"save_s": seconds}), flush=True)


def worker_load(root: Path, zero_stage: int) -> None:
    """On every rank: build the engine for `zero_stage` and restore the checkpoint (natively or converted)."""
    from pretrain.core.checkpoint import Checkpointer
    from pretrain.core.distributed import barrier
    from pretrain.core.reshard import restore
    from pretrain.core.run_dir import RunDir

    config = _run_config(zero_stage)
    engine, world = _engine(config)
    run_dir = RunDir(root)
    checkpoint = run_dir.latest_checkpoint()
    assert checkpoint is not None
    barrier()
    started = time.perf_counter()
    restore(Checkpointer(run_dir, keep_last=3, world=world), engine, checkpoint, config, world)
    barrier()
    if world.is_main:
        print(json.dumps({"load_s": time.perf_counter() - started}), flush=True)


def worker_convert(checkpoint: Path) -> None:
    """One process: our conversion, with its peak resident and peak anonymous memory."""
    import deepspeed.checkpoint.constants  # noqa: F401  (imports are not the conversion's time)

    from pretrain.core.checkpoint_convert import convert
    from pretrain.core.run_dir import CheckpointDir

    peak_anonymous = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak_anonymous
        while not done.wait(0.005):
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    peak_anonymous = max(peak_anonymous, int(line.split()[1]))

    sampler = threading.Thread(target=sample, daemon=True)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sampler.start()
    started = time.perf_counter()
    path = convert(CheckpointDir(checkpoint))
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    print(
        json.dumps(
            {
                "convert_s": seconds,
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "rss_before_mib": baseline / 1024,
                "peak_anonymous_mib": peak_anonymous / 1024,
                "portable_mib": path.stat().st_size / 2**20,
            }
        ),
        flush=True,
    )


def worker_universal(checkpoint: Path, out: Path) -> None:
    """DeepSpeed's converter, in-process as its command line would run it."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    started = time.perf_counter()
    ds_to_universal(
        argparse.Namespace(
            input_folder=str(checkpoint),
            output_folder=str(out),
            num_extract_workers=2,
            num_merge_workers=2,
            keep_temp_folder=False,
            strict=True,
            inject_missing_state=True,  # our module declares no universal_checkpoint_info
        )
    )
    print(json.dumps({"universal_s": time.perf_counter() - started}), flush=True)


def _launch(ranks: int, *worker: str) -> dict[str, float]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    command = (
        [*command, __file__, "--worker", *worker] if ranks > 1 else [sys.executable, __file__, "--worker", *worker]
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(worker)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    figures: dict[str, float] = {}
    for line in done.stdout.splitlines():
        if line.startswith("{"):
            figures.update(json.loads(line))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zero", type=int, default=2, help="ZeRO stage of the saved checkpoint (1 or 2)")
    parser.add_argument("--keep", type=Path, help="write the run here and keep it (default: a temporary directory)")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        sys.path.insert(0, str(REPO))
        kind, *rest = args.worker
        {"save": lambda: worker_save(Path(rest[0]), int(rest[1])),
         "load": lambda: worker_load(Path(rest[0]), int(rest[1])),
         "convert": lambda: worker_convert(Path(rest[0])),
         "universal": lambda: worker_universal(Path(rest[0]), Path(rest[1]))}[kind]()  # fmt: skip
        return
    with tempfile.TemporaryDirectory() as temp:
        root = args.keep or Path(temp) / "run"
        checkpoint = root / "checkpoints" / "step-00000001"
        saved = _launch(2, "save", str(root), str(args.zero))
        converted = _launch(1, "convert", str(checkpoint))
        universal = _launch(1, "universal", str(checkpoint), str(Path(temp) / "universal"))
        native = _launch(2, "load", str(root), str(args.zero))
        portable = _launch(2, "load", str(root), "3")
    print(f"bench_reshard: gpt2-small (124.4 M parameters), ZeRO-{args.zero} checkpoint of 2 CPU ranks")
    print(f"  save (2 ranks)                          {saved['save_s']:8.1f} s")
    print(
        f"  convert to portable (1 process)         {converted['convert_s']:8.1f} s   "
        f"x{converted['convert_s'] / saved['save_s']:.2f} the save; peak RSS {converted['peak_rss_mib']:,.0f} MiB "
        f"(at start {converted['rss_before_mib']:,.0f}), peak anonymous {converted['peak_anonymous_mib']:,.0f} MiB, "
        f"file {converted['portable_mib']:,.0f} MiB"
    )
    print(
        f"  DeepSpeed ds_to_universal (2 workers)   {universal['universal_s']:8.1f} s   "
        f"x{universal['universal_s'] / converted['convert_s']:.2f} our conversion"
    )
    print(f"  load, same layout (native, 2 ranks)     {native['load_s']:8.1f} s")
    print(
        f"  load, portable into ZeRO-3 (2 ranks)    {portable['load_s']:8.1f} s   "
        f"x{portable['load_s'] / native['load_s']:.2f} the native load"
    )


if __name__ == "__main__":
    main()
