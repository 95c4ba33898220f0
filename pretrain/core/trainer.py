"""The training loop: read it as the algorithm; everything that observes it is a callback.

restore the latest complete checkpoint (model, optimizer, schedule, data cursor, counters)
until max_steps: one optimizer step over the global batch (the step object runs the micro-batches),
    skipping steps whose loss is not finite; callbacks log, evaluate, checkpoint
on SIGTERM/SIGINT/SIGUSR1: finish the step, checkpoint, exit 0 so the same command resumes

The loop does not know the layout: steps.py's step object (plain or pipeline) does what a step and an
evaluation pass mean for it. How the run ended is one value, `outcome`, written to RUN/status.json.
"""

from __future__ import annotations

import json
import math
import resource
import signal
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.app import to_container, to_yaml
from common.errors import UserError
from common.files import append_line, write_text_atomic
from pretrain.core.callbacks import Callback, default_callbacks, ordered
from pretrain.core.checkpoint import Checkpointer
from pretrain.core.config import RunConfig
from pretrain.core.data import BatchLayout, eval_batches, open_sources, train_loader
from pretrain.core.distributed import World, all_reduce_max, all_reduce_sum, barrier
from pretrain.core.engine import build_train_step
from pretrain.core.faults import Faults
from pretrain.core.library_internals import shutdown_loader_workers
from pretrain.core.mixture import DataSources
from pretrain.core.model import GPT
from pretrain.core.model_config import ModelConfig
from pretrain.core.reshard import restore
from pretrain.core.run_dir import Outcome, ProcessInfo, RunDir

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


@dataclass
class TrainerState:
    step: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0
    skipped_steps: int = 0
    nonfinite_streak: int = 0


class Trainer:
    """One invocation of a run. `config` is validated (pretrain/__main__.py) and never changed here;
    `sources` are its datasets (one, or a mixture), loaded once by the caller."""

    def __init__(
        self, config: RunConfig, sources: DataSources, world: World, callbacks: Sequence[Callback] | None = None
    ) -> None:
        self.config, self.sources, self.world = config, sources, world
        # What every source shares (validated): vocabulary, special ids, seq_len, tokenizer.
        self.manifest = manifest = sources.manifest
        self.run_dir = RunDir(config.run_dir)
        # The model's shape with the dataset's vocabulary filled in (the config may leave it unset).
        self.model_config: ModelConfig = replace(config.model, vocab_size=manifest.vocab_size)
        self.tokenizer = sources.tokenizer_bytes()
        self.mixture_entry: dict[str, Any] | None = None  # the data mixture this invocation starts or changes to
        self.state = TrainerState()
        self.outcome: Outcome | None = None  # None while the run goes on
        self.faults = Faults.from_env()
        self._signal: int | None = None
        self._saved_step = -1
        # Wall time spent inside training steps (data wait included), for throughput.
        self.step_seconds = 0.0
        flops = self.model_config.flops_per_token(manifest.vocab_size, manifest.seq_len)
        self.callbacks = ordered(callbacks) if callbacks is not None else default_callbacks(config, self.run_dir, flops)
        self.checkpointer = Checkpointer(
            self.run_dir, config.checkpoint.keep_last, world, self.faults.kill_during_save_step
        )

    # ----------------------------------------------------------------------------------------- set-up
    def _build(self) -> None:
        config, world, manifest = self.config, self.world, self.manifest
        if world.is_main:
            self.run_dir.root.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.run_dir.config_file, to_yaml(config))
            self.run_dir.write_process(ProcessInfo.current())  # a dashboard tells a crash from a live run by it
        barrier()
        cache = self.run_dir.cache
        if world.is_main:  # one rank indexes the shards; the others read its cached index
            open_sources(self.sources, cache)
        barrier()
        self.train_set, self.val_sets = open_sources(self.sources, cache)
        if config.precision == "fp16" and world.device.type == "cpu":
            # DeepSpeed's CPU accelerator refuses fp16 ("Type fp16 is not supported on your device").
            raise UserError("precision=fp16 is not supported on CPU by DeepSpeed; use precision=bf16 or fp32")
        torch.manual_seed(config.seed)  # the same initial weights on every rank
        model = GPT(self.model_config)
        self.step = build_train_step(model, config, world.world_size, world.rank, world.device, manifest.seq_len)
        self.layout = BatchLayout(
            config.train.micro_batch_size,
            config.accumulation_steps(self.step.data_parallel_size),
            self.step.data_parallel_size,
            self.step.data_parallel_rank,
        )

    def _restore(self) -> None:
        latest = self.checkpointer.latest()
        if latest is None:
            self.mixture_entry = self.sources.begin(self.config.seed)
            return
        # Any layout resumes any checkpoint (converted when DeepSpeed cannot load it as it is); another model or
        # tokenizer was refused before anything started (layout.resume_problems).
        faults = self.faults.kill_during_conversion_after
        saved = restore(self.checkpointer, self.step.engine, latest, self.config, self.world, faults)
        self.state = TrainerState(**saved["trainer"])
        self.mixture_entry = self.sources.resume(
            saved,
            self.state.step,
            self.state.consumed_samples,
            self.config.data_reweight,
            self.config.seed,
            f"checkpoint {latest.path}",
        )
        for callback in self.callbacks:
            if callback.state_key and callback.state_key in saved.get("callbacks", {}):
                callback.load_state_dict(saved["callbacks"][callback.state_key])
        self._saved_step = self.state.step
        if self.world.is_main:
            print(
                f"resumed from {latest.path} at step {self.state.step} "
                f"({self.state.consumed_samples} samples consumed)",
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
            order=self.sources.order(),
        )
        self._batches = iter(loader)
        previous = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        try:
            self._dispatch("on_train_start")
            if self.mixture_entry is not None:
                self._dispatch("on_mixture", self.mixture_entry)
            self._interval_losses: list[torch.Tensor] = []
            first_step, per_run = self.state.step, self.config.train.steps_per_run
            while self.state.step < self.config.train.max_steps and self.outcome is None:
                started = time.perf_counter()
                self._train_step()
                self.step_seconds += time.perf_counter() - started
                # The step's metrics are written before its step-end callbacks may checkpoint it, so a
                # checkpoint never holds a step whose line metrics.jsonl lacks (a kill between the two would
                # leave a gap in the history on resume).
                if self.state.step % self.config.train.log_interval == 0:
                    self._log()
                self._dispatch("on_step_end")
                self._check_signals()
                if per_run and self.state.step - first_step >= per_run:
                    self.request_stop(f"train.steps_per_run={per_run} steps done in this run", requeue=True)
            # A stop asked for at the very last step still finished the run (nothing to requeue).
            if self.state.step >= self.config.train.max_steps and (
                self.outcome is None or self.outcome.state != "failed"
            ):
                self.outcome = Outcome("finished")
            self._dispatch("on_train_end")
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            # Now: the workers ignore stop signals (data._ignore_stop_signals), so nothing else would end them.
            shutdown_loader_workers(self.__dict__.pop("_batches", None))
        outcome = self.outcome
        assert outcome is not None  # the loop ends only on max_steps or with an outcome
        if self.world.is_main:
            self._print_end(outcome)
            self.run_dir.write_status(outcome, self.state.step, self.config.train.max_steps)
        return 1 if outcome.state == "failed" else 0

    def _seed_step(self) -> None:
        # Dropout randomness as a function of (seed, step, rank): a resumed run draws exactly what an
        # uninterrupted one would, whatever happened before the checkpoint.
        seed = int(np.random.SeedSequence([self.config.seed, self.state.step, self.world.rank]).generate_state(1)[0])
        torch.manual_seed(seed)

    def _train_step(self) -> None:
        self._seed_step()
        consumed: list[int] = []
        step_loss = self.step.train(self._batches, consumed, self.faults.poisons(self.state.step + 1))
        if self.config.train.trace_samples and consumed:
            append_line(
                self.run_dir.samples_trace(self.world.rank),
                json.dumps({"step": self.state.step + 1, "samples": self.train_set.trace_labels(consumed)}),
            )
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

    def _count_nonfinite(self) -> None:
        applied = self.step.step_applied()
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
        limit = self.config.train.max_nonfinite_steps
        if self.state.nonfinite_streak >= limit and self.outcome is None:
            self.outcome = Outcome(
                "failed",
                f"{self.state.nonfinite_streak} non-finite losses in a row (train.max_nonfinite_steps={limit}): "
                "lower train.lr, raise train.warmup_steps, or use bf16 instead of fp16; the checkpoints before "
                "the divergence are kept",
            )

    def _log(self) -> None:
        losses = self._interval_losses
        totals = all_reduce_sum(
            torch.stack([torch.stack(losses).sum(), torch.tensor(float(len(losses)))]) if losses else torch.zeros(2)
        )
        metrics: dict[str, Any] = {
            "step": self.state.step,
            "consumed_samples": self.state.consumed_samples,
            "tokens": self.state.consumed_tokens,
            **self.sources.consumed_tokens(self.state.consumed_samples),
            "loss": float(totals[0] / totals[1]) if totals[1] > 0 else float("nan"),
            "lr": self.step.lr(),
            "grad_norm": self.step.grad_norm(),
            "skipped_steps": self.state.skipped_steps,
            "world_size": self.world.world_size,
            "peak_memory_mb": all_reduce_max(peak_memory_mb(self.world.device)),
        }
        self._interval_losses = []
        self._dispatch("on_log", metrics)

    # -------------------------------------------------------------------- what callbacks may ask for
    def request_stop(self, reason: str, *, requeue: bool = False) -> None:
        if self.outcome is None:
            self.outcome = Outcome("stopped", reason, requeue)

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any] | None:
        if not self.val_sets:
            return None
        started = time.perf_counter()
        # Each source's validation set on its own (every rank in the same order: passes are collective), then
        # the token-weighted mean over all of them.
        totals, layout = {}, self.layout
        for name, val_set in self.val_sets.items():
            batches = eval_batches(
                val_set,
                self.config.eval.samples,
                layout.micro_batch_size,
                layout.data_parallel_rank,
                layout.data_parallel_size,
            )
            totals[name] = all_reduce_sum(self.step.evaluate(list(batches)))
        total = torch.stack(list(totals.values())).sum(dim=0)
        metrics = {
            "step": self.state.step,
            "tokens": self.state.consumed_tokens,
            **_loss_metrics(total),
            "eval_samples": int(total[1]) // self.manifest.seq_len,
            "eval_seconds": time.perf_counter() - started,
        }
        if self.sources.is_mixture:
            for name, source_total in totals.items():
                metrics.update({f"{key}/{name}": value for key, value in _loss_metrics(source_total).items()})
        self._dispatch("on_eval", metrics)
        return metrics

    def save_checkpoint(self) -> Path | None:
        if self._saved_step == self.state.step:
            return None
        state = {
            "trainer": asdict(self.state),
            "callbacks": {c.state_key: c.state_dict() for c in self.callbacks if c.state_key},
            "tokenizer_sha256": self.manifest.tokenizer_sha256,
            **self.sources.checkpoint_fields(),  # data_dir or data_dirs, and the mixture's run state
            "world_size": self.world.world_size,
            "zero_stage": self.config.zero_stage,
            "pipeline_stages": self.config.parallel.pipeline_stages,
            "config": to_container(self.config),
            # What a checkpoint needs to be used on its own (generate, evaluate, export): the model's shape with
            # its vocabulary, and the length of the sequences it was trained on.
            "model": asdict(self.model_config),
            "seq_len": self.manifest.seq_len,
        }
        checkpoint = self.checkpointer.save(self.step.engine, self.state.step, state, self.tokenizer)
        self._saved_step = self.state.step
        self._dispatch("on_checkpoint", checkpoint.path)
        return checkpoint.path

    def all_reduce_sum(self, values: Sequence[float]) -> list[float]:
        return [float(v) for v in all_reduce_sum(torch.tensor(list(values), dtype=torch.float64)).tolist()]

    # --------------------------------------------------------------------------------- stop signals
    def _on_signal(self, signum: int, _frame: Any) -> None:
        self._signal = signum  # acted upon at the end of the current step, on every rank together

    def _check_signals(self) -> None:
        flag = all_reduce_max(float(self._signal or 0))
        if flag:
            # SIGUSR1 is the scheduler's "time is almost up" warning: the run should come back. SIGTERM and
            # SIGINT are someone stopping it (scancel, Ctrl-C): it should not.
            self.request_stop(f"received {signal.Signals(int(flag)).name}", requeue=int(flag) == signal.SIGUSR1)

    def _dispatch(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)

    def _print_end(self, outcome: Outcome) -> None:
        where = self.run_dir.checkpoint(self.state.step).path
        if outcome.state == "finished":
            print(f"finished {self.state.step} steps; checkpoint {where}", flush=True)
        else:
            print(
                f"stopped at step {self.state.step}: {outcome.reason}; checkpoint {where}; "
                "run the same command to resume",
                flush=True,
            )


def _loss_metrics(total: torch.Tensor) -> dict[str, float]:
    """val_loss and val_perplexity of evaluation totals [sum of token losses, tokens]."""
    val_loss = float(total[0] / total[1])
    return {"val_loss": val_loss, "val_perplexity": math.exp(min(val_loss, 50.0))}


def peak_memory_mb(device: torch.device) -> float:
    """This rank's peak memory so far: the CUDA allocator's peak on GPUs, the process' max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
