"""The training loop: read it as the algorithm; everything that observes it is a callback.

restore the latest complete checkpoint (model, optimizer, schedule, data cursor, counters)
until max_steps: one optimizer step over the global batch (gradient accumulation over micro-batches),
    skipping steps whose loss is not finite; callbacks log, evaluate, checkpoint
on SIGTERM/SIGINT/SIGUSR1: finish the step, checkpoint, exit 0 so the same command resumes
"""

from __future__ import annotations

import json
import math
import os
import resource
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.app import to_container, to_yaml
from common.errors import UserError
from common.files import write_json_atomic
from data_prep.manifest import Manifest, load_manifest
from pretrain.callbacks import Callback, default_callbacks
from pretrain.checkpoint import FAULT_ENV, Checkpointer, check_resume_layout, tag_for
from pretrain.config import RunConfig, validate_run
from pretrain.data import BatchLayout, TokenSamples, build_index, eval_batches, train_loader
from pretrain.distributed import World, all_reduce_max, all_reduce_sum, barrier
from pretrain.engine import build_engine
from pretrain.model import GPT

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


@dataclass
class TrainerState:
    step: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0
    skipped_steps: int = 0
    nonfinite_streak: int = 0


class Trainer:
    def __init__(self, config: RunConfig, world: World, callbacks: list[Callback] | None = None) -> None:
        self.config, self.world = config, world
        self.data_dir, self.run_dir = Path(config.data_dir), Path(config.run_dir)
        self.manifest: Manifest = load_manifest(self.data_dir)
        validate_run(config, self.manifest, world.world_size)
        config.model.vocab_size = self.manifest.vocab_size
        self.state = TrainerState()
        self.finished = False
        self.failed = False
        # Whether the run stopped early to be started again (launchers requeue it): see status.json.
        self.come_back = False
        self.stop_reason: str | None = None
        self._signal: int | None = None
        self._saved_step = -1
        # Wall time spent inside training steps (data wait included), for throughput.
        self.step_seconds = 0.0
        self.pipelined = config.parallel.pipeline_stages > 1
        self.callbacks = callbacks if callbacks is not None else default_callbacks(self)
        self.checkpointer = Checkpointer(self.run_dir, config.checkpoint.keep_last, world)

    # ----------------------------------------------------------------------------------------- set-up
    def _build(self) -> None:
        config, world = self.config, self.world
        if world.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(to_yaml(config), encoding="utf-8")
            tokenizer = self.data_dir / self.manifest.tokenizer_file
            (self.run_dir / "tokenizer.model").write_bytes(tokenizer.read_bytes())
        barrier()
        index_cache = self.run_dir / "cache"
        if world.is_main:  # one rank indexes the shards; the others read its cached index
            build_index(self.data_dir, self.manifest, "train", index_cache)
            if self.manifest.splits.get("val") and self.manifest.splits["val"].samples:
                build_index(self.data_dir, self.manifest, "val", index_cache)
        barrier()
        seq_len = self.manifest.seq_len
        self.train_set = TokenSamples(build_index(self.data_dir, self.manifest, "train", index_cache), seq_len)
        has_val = bool(self.manifest.splits.get("val") and self.manifest.splits["val"].samples)
        self.val_set = (
            TokenSamples(build_index(self.data_dir, self.manifest, "val", index_cache), seq_len) if has_val else None
        )
        if config.precision == "fp16" and world.device.type == "cpu":
            # DeepSpeed's CPU accelerator refuses fp16 ("Type fp16 is not supported on your device").
            raise UserError("precision=fp16 is not supported on CPU by DeepSpeed; use precision=bf16 or fp32")
        torch.manual_seed(config.seed)  # the same initial weights on every rank
        model = GPT(config.model)
        self.engine, self.scheduler = build_engine(
            model, config, config.data_parallel_size(world.world_size), world.device
        )
        if self.pipelined:  # the data-parallel coordinate of this rank in the pipeline x data grid
            grid = self.engine.grid
            data_rank, data_size = grid.get_data_parallel_rank(), grid.get_data_parallel_world_size()
        else:
            data_rank, data_size = world.rank, world.world_size
        self.layout = BatchLayout(
            config.train.micro_batch_size, config.accumulation_steps(data_size), data_size, data_rank
        )

    def _restore(self) -> None:
        latest = self.checkpointer.latest()
        if latest is None:
            return
        check_resume_layout(latest, self.config, self.layout.data_parallel_size)
        saved = self.checkpointer.load(self.engine, latest)
        if saved.get("tokenizer_sha256") != self.manifest.tokenizer_sha256:
            raise UserError(
                f"run_dir={self.config.run_dir!r} was trained with another tokenizer (checkpoint {latest.name}); "
                "use a new run_dir for this dataset"
            )
        self.state = TrainerState(**saved["trainer"])
        for callback in self.callbacks:
            if callback.state_key and callback.state_key in saved.get("callbacks", {}):
                callback.load_state_dict(saved["callbacks"][callback.state_key])
        self._saved_step = self.state.step
        if self.world.is_main:
            print(
                f"resumed from {latest} at step {self.state.step} ({self.state.consumed_samples} samples consumed)",
                flush=True,
            )

    # ------------------------------------------------------------------------------------------- loop
    def run(self) -> int:
        self._build()
        self._restore()
        loader = train_loader(
            self.train_set,
            self.layout,
            self.config.seed,
            self.state.consumed_samples,
            self.config.train.num_workers,
            pin_memory=self.world.device.type == "cuda",
        )
        self._batches = iter(loader)
        previous = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        try:
            self._dispatch("on_train_start")
            self._interval_losses: list[torch.Tensor] = []
            first_step, per_run = self.state.step, self.config.train.steps_per_run
            while self.state.step < self.config.train.max_steps and self.stop_reason is None:
                started = time.perf_counter()
                self._train_step()
                self.step_seconds += time.perf_counter() - started
                # The step's metrics are written before its step-end callbacks may checkpoint it, so a
                # checkpoint never holds a step whose line metrics.jsonl lacks (a kill between the two would
                # leave a gap in the history on resume).
                if self.state.step % self.config.train.log_interval == 0:
                    self._log()
                self._dispatch("on_step_end")
                self._check_stop()
                if per_run and self.state.step - first_step >= per_run and self.stop_reason is None:
                    self.stop_reason = f"train.steps_per_run={per_run} steps done in this run"
                    self.come_back = True
            self.finished = self.state.step >= self.config.train.max_steps
            self._dispatch("on_train_end")
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            self._close_loader()
        if self.world.is_main:
            self._print_end()
            self._write_status()
        return 1 if self.failed else 0

    def _close_loader(self) -> None:
        # Shut the DataLoader's workers down now: they ignore stop signals (see data._ignore_stop_signals), so
        # multiprocessing's exit-time terminate() would not end them and the rank would wait on them forever.
        iterator = self.__dict__.pop("_batches", None)
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()

    def _seed_step(self) -> None:
        # Dropout randomness as a function of (seed, step, rank): a resumed run draws exactly what an
        # uninterrupted one would, whatever happened before the checkpoint.
        seed = int(np.random.SeedSequence([self.config.seed, self.state.step, self.world.rank]).generate_state(1)[0])
        torch.manual_seed(seed)

    def _train_step(self) -> None:
        self._seed_step()
        self.engine.train()
        consumed: list[int] = []
        step_loss = self._pipeline_step(consumed) if self.pipelined else self._plain_step(consumed)
        if self.config.train.trace_samples and consumed:
            with open(self.run_dir / f"samples-rank{self.world.rank}.jsonl", "a", encoding="utf-8") as trace:
                trace.write(json.dumps({"step": self.state.step + 1, "samples": consumed}) + "\n")
        # Non-finite gradients make DeepSpeed skip the update (no weight, moment or schedule change);
        # a non-finite loss is what we count, and stop on when it persists.
        loss_finite = all_reduce_max(0.0 if bool(torch.isfinite(step_loss)) else 1.0) == 0.0
        self.state.step += 1
        self.state.consumed_samples += self.layout.global_batch_size
        self.state.consumed_tokens += self.layout.global_batch_size * self.manifest.seq_len
        if loss_finite:
            self.state.nonfinite_streak = 0
            self._interval_losses.append(step_loss)
        else:
            self._count_nonfinite()

    def _plain_step(self, consumed: list[int]) -> torch.Tensor:
        losses = []
        use_segments = self.config.model.doc_mask
        device = self.world.device
        for micro_step in range(self.layout.accumulation_steps):
            batch = next(self._batches)
            consumed += batch["indices"].tolist()
            loss = self.engine(
                batch["input_ids"].to(device, non_blocking=True),
                batch["targets"].to(device, non_blocking=True),
                batch["segment_ids"].to(device, non_blocking=True) if use_segments else None,
            )
            if _fault("nan_loss", self.state.step + 1) and micro_step == 0:
                loss = loss * float("nan")
            losses.append(loss.detach().float())
            self.engine.backward(loss)
            self.engine.step()  # DeepSpeed applies the optimizer only at the accumulation boundary
        return torch.stack(losses).mean()

    def _pipeline_step(self, consumed: list[int]) -> torch.Tensor:
        """One global batch through the pipeline: DeepSpeed's schedule runs every micro-batch, the step, and
        broadcasts the last stage's mean loss to every stage."""
        from pretrain import pipeline

        first_stage = self.engine.is_first_stage()

        def micro_batches():
            while True:
                batch = next(self._batches)
                if first_stage:  # the first and last stage both read the batch: count it once
                    consumed.extend(batch["indices"].tolist())
                yield batch["input_ids"], batch["targets"]

        pipeline.poison_loss = _fault("nan_loss", self.state.step + 1)
        return self.engine.train_batch(data_iter=micro_batches()).detach().float().cpu()

    def _count_nonfinite(self) -> None:
        applied = self.engine.was_step_applied()
        self.state.skipped_steps += 1
        self.state.nonfinite_streak += 1
        if self.world.is_main:
            print(
                f"step {self.state.step}: non-finite loss, step skipped "
                f"({self.state.nonfinite_streak} in a row, {self.state.skipped_steps} in all)",
                flush=True,
            )
        if applied:
            raise RuntimeError(f"step {self.state.step}: the optimizer applied a step whose loss was not finite")
        if self.state.nonfinite_streak >= self.config.train.max_nonfinite_steps:
            self.failed = True
            self.stop_reason = (
                f"{self.state.nonfinite_streak} non-finite losses in a row (train.max_nonfinite_steps="
                f"{self.config.train.max_nonfinite_steps}): lower train.lr, raise train.warmup_steps, or use bf16 "
                "instead of fp16; the checkpoints before the divergence are kept"
            )

    def _log(self) -> None:
        losses = self._interval_losses
        totals = all_reduce_sum(
            torch.stack([torch.stack(losses).sum(), torch.tensor(float(len(losses)))]) if losses else torch.zeros(2)
        )
        world = self.world.world_size
        loss = float(totals[0] / totals[1]) if totals[1] > 0 else float("nan")
        grad_norm = self.engine.get_global_grad_norm()
        metrics: dict[str, Any] = {
            "step": self.state.step,
            "consumed_samples": self.state.consumed_samples,
            "tokens": self.state.consumed_tokens,
            "loss": loss,
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "skipped_steps": self.state.skipped_steps,
            "world_size": world,
            "peak_memory_mb": all_reduce_max(peak_memory_mb(self.world.device)),
        }
        self._interval_losses = []
        self._dispatch("on_log", metrics)

    # ----------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, Any] | None:
        if self.val_set is None:
            return None
        started = time.perf_counter()
        self.engine.eval()
        batches = eval_batches(
            self.val_set,
            self.config.eval.samples,
            self.layout.micro_batch_size,
            self.layout.data_parallel_rank,
            self.layout.data_parallel_size,
        )
        total = self._pipeline_eval(list(batches)) if self.pipelined else self._plain_eval(batches)
        total = all_reduce_sum(total)
        self.engine.train()
        val_loss = float(total[0] / total[1])
        metrics = {
            "step": self.state.step,
            "tokens": self.state.consumed_tokens,
            "val_loss": val_loss,
            "val_perplexity": math.exp(min(val_loss, 50.0)),
            "eval_samples": int(total[1]) // self.manifest.seq_len,
            "eval_seconds": time.perf_counter() - started,
        }
        self._dispatch("on_eval", metrics)
        return metrics

    def _plain_eval(self, batches) -> torch.Tensor:
        total = torch.zeros(2, dtype=torch.float64)  # (sum of token losses, tokens)
        device = self.world.device
        for batch, weights in batches:
            token_losses = self.engine(
                batch["input_ids"].to(device),
                batch["targets"].to(device),
                batch["segment_ids"].to(device) if self.config.model.doc_mask else None,
                reduction="none",
            ).view(len(weights), -1)
            per_sample = token_losses.double().sum(dim=1).cpu()
            total += torch.stack(
                [(per_sample * weights.double()).sum(), weights.double().sum() * token_losses.shape[1]]
            )
        return total

    def _pipeline_eval(self, batches: list) -> torch.Tensor:
        """Padding samples get targets of -100, which the pipeline's loss ignores; it returns the real tokens'
        loss sum over all positions, averaged over micro-batches, on every stage of the pipeline."""
        inputs = []
        for batch, weights in batches:
            targets = batch["targets"].clone()
            targets[weights == 0] = -100
            inputs.append((batch["input_ids"], targets))
        mean = self.engine.eval_batch(iter(inputs), num_micro_batches=len(inputs), bcast_loss=True)
        positions = len(inputs) * self.layout.micro_batch_size * self.manifest.seq_len
        real = sum(float(w.sum()) for _, w in batches) * self.manifest.seq_len
        if not self.engine.is_first_stage():
            # Every stage holds the same figures after the broadcast: count each data-parallel replica once.
            return torch.zeros(2, dtype=torch.float64)
        return torch.tensor([float(mean) * positions, real], dtype=torch.float64)

    # ---------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> None:
        if self._saved_step == self.state.step:
            return
        state = {
            "trainer": asdict(self.state),
            "callbacks": {c.state_key: c.state_dict() for c in self.callbacks if c.state_key},
            "tokenizer_sha256": self.manifest.tokenizer_sha256,
            "data_dir": str(self.data_dir),
            "world_size": self.world.world_size,
            "zero_stage": self.config.zero_stage,
            "pipeline_stages": self.config.parallel.pipeline_stages,
            "config": to_container(self.config),
            "tag": tag_for(self.state.step),
        }
        path = self.checkpointer.save(self.engine, self.state.step, state)
        self._saved_step = self.state.step
        self._dispatch("on_checkpoint", path)

    # --------------------------------------------------------------------------------- stop signals
    def _on_signal(self, signum: int, _frame: Any) -> None:
        self._signal = signum  # acted upon at the end of the current step, on every rank together

    def _check_stop(self) -> None:
        flag = all_reduce_max(float(self._signal or 0))
        if flag and self.stop_reason is None:
            self.stop_reason = f"received {signal.Signals(int(flag)).name}"
            # SIGUSR1 is the scheduler's "time is almost up" warning: the run should come back. SIGTERM and
            # SIGINT are someone stopping it (scancel, Ctrl-C): it should not.
            self.come_back = int(flag) == signal.SIGUSR1

    def _dispatch(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)

    def _write_status(self) -> None:
        """`RUN/status.json`: how the last invocation ended (launchers requeue a run that did not finish)."""
        state = "finished" if self.finished else ("failed" if self.failed else "stopped")
        write_json_atomic(
            self.run_dir / "status.json",
            {
                "state": state,
                "step": self.state.step,
                "max_steps": self.config.train.max_steps,
                "reason": self.stop_reason,
                "requeue": state == "stopped" and self.come_back,
            },
        )

    def _print_end(self) -> None:
        where = self.run_dir / "checkpoints" / tag_for(self.state.step)
        if self.finished:
            print(f"finished {self.state.step} steps; checkpoint {where}", flush=True)
        else:
            print(
                f"stopped at step {self.state.step}: {self.stop_reason}; checkpoint {where}; "
                "run the same command to resume",
                flush=True,
            )


def peak_memory_mb(device: torch.device) -> float:
    """This rank's peak memory so far: the CUDA allocator's peak on GPUs, the process' max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _fault(kind: str, step: int) -> bool:
    """Fault injection for tests: PRETRAIN_FAULT="nan_loss:3,4" poisons the loss of steps 3 and 4."""
    spec = os.environ.get(FAULT_ENV, "")
    name, _, steps = spec.partition(":")
    return name == kind and str(step) in steps.split(",")
