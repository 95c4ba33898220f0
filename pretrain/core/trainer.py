"""The training loop: read it as the algorithm; everything that observes it is a callback.

restore the latest complete checkpoint (model, optimizer, schedule, data cursor, counters)
until max_steps: one optimizer step over the global batch (the step object runs the micro-batches),
    skipping steps whose loss is not finite; callbacks log, evaluate, checkpoint;
    on a loss spike (callbacks/spikes.py): reload the last checkpoint in-process, skip data, go on
on SIGTERM/SIGINT/SIGUSR1: finish the step, checkpoint, exit 0 so the same command resumes

Every phase has a deadline (watchdog.py): a step distributed.step_timeout_s, start-up, evaluations and saves
distributed.timeout_s; a rank past it reports a lost or hung peer and exits for the run to be restarted.

The loop does not know the layout: steps.py's step object (plain or pipeline) does what a step and an
evaluation pass mean for it. How the run ended is one value, `outcome`, written to RUN/status.json.
"""

from __future__ import annotations

import math
import resource
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.app import to_container, to_yaml
from common.errors import UserError
from common.files import write_text_atomic
from pretrain.core.callbacks import Callback, Rollback, default_callbacks, ordered
from pretrain.core.checkpoint import Checkpointer
from pretrain.core.checkpoint_writes import CheckpointNotSaved
from pretrain.core.config import RunConfig
from pretrain.core.data import BatchLayout, eval_batches, open_sources, train_loader
from pretrain.core.distributed import World, all_reduce_max, all_reduce_sum, raise_on_every_rank
from pretrain.core.engine import build_train_step
from pretrain.core.faults import Faults
from pretrain.core.layout import starts_its_data, weights_precision
from pretrain.core.library_internals import shutdown_loader_workers
from pretrain.core.mixture import DataSources
from pretrain.core.model import GPT
from pretrain.core.model_config import ModelConfig
from pretrain.core.reshard import restore
from pretrain.core.run_dir import Outcome, ProcessInfo, RunDir
from pretrain.core.sample_trace import SampleTrace
from pretrain.core.watchdog import ProgressWatchdog

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


@dataclass
class TrainerState:
    step: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0
    skipped_steps: int = 0
    nonfinite_streak: int = 0
    # Loss-spike rollbacks so far, and the data positions they skipped (included in consumed_samples).
    rollbacks: int = 0
    skipped_samples: int = 0


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
        self.imported_from: dict[str, Any] | None = None  # a run that started from pretrain.import_hf: where from
        self.state = TrainerState()
        self.outcome: Outcome | None = None  # None while the run goes on
        self.faults = Faults.from_env()
        self.watchdog = ProgressWatchdog(world.label, self.run_dir.watchdog_dump(world.rank))
        self.watchdog.expect("start-up (index, engine, restore)", config.distributed.timeout_s)
        self.trace = SampleTrace(self.run_dir.samples_trace(world.rank), config.train.trace_samples)
        self.last_loss = math.nan  # the last step's loss, all ranks' mean
        self._signal: int | None = None
        self._saved_step = -1
        self._unsaved_step = -1  # a step whose save failed (not retried at the end)
        self._rollback: tuple[str, int] | None = None  # (reason, skip_batches) asked by a callback
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
        problem = None  # every rank raises a problem found by one (raise_on_every_rank): none waits for the others
        if world.is_main:
            try:
                self.run_dir.root.mkdir(parents=True, exist_ok=True)
                write_text_atomic(self.run_dir.config_file, to_yaml(config))
                self.run_dir.write_process(ProcessInfo.current())  # a dashboard tells a crash from a live run by it
            except OSError as error:
                problem = f"run_dir={config.run_dir!r} is not writable ({error}); free space there or choose another"
        raise_on_every_rank(problem)
        # Every shard of every source is checked against its manifest's sha256 before it is first indexed.
        self.train_set, self.val_sets = open_sources(
            self.sources, self.run_dir.cache, world.rank, world.world_size, raise_on_every_rank
        )
        if config.precision == "fp16" and world.device.type == "cpu":
            # DeepSpeed's CPU accelerator refuses fp16 ("Type fp16 is not supported on your device").
            raise UserError(
                "precision=fp16 is not supported on CPU by DeepSpeed; use precision=bf16, bf16-weights or fp32"
            )
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
        self.imported_from = saved.get("imported_from")  # kept in every checkpoint: the model card names it
        self.mixture_entry = self._data_order_at(saved, self.state, f"checkpoint {latest.path}")
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
        self.trace.truncate_after(self.state.step)  # steps past the checkpoint are trained again
        self._open_loader()
        timeouts = self.config.distributed
        previous = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        try:
            self._dispatch("on_train_start")
            if self.mixture_entry is not None:
                self._dispatch("on_mixture", self.mixture_entry)
            self._interval_losses: list[torch.Tensor] = []
            first_step, per_run = self.state.step, self.config.train.steps_per_run
            while self.state.step < self.config.train.max_steps and self.outcome is None:
                self.watchdog.expect(f"training step {self.state.step + 1}", timeouts.step_timeout_s)
                hang = self.state.step + 1
                self.faults.hang_if_due(hang, self.world.is_main, self.run_dir.fault_marker(f"hang_at_step-{hang}"))
                started = time.perf_counter()
                self._train_step()
                self.step_seconds += time.perf_counter() - started
                self.watchdog.expect(f"the evaluation or checkpoint after step {self.state.step}", timeouts.timeout_s)
                # The step's metrics are written before its step-end callbacks may checkpoint it, so a
                # checkpoint never holds a step whose line metrics.jsonl lacks (a kill between the two would
                # leave a gap in the history on resume).
                if self.state.step % self.config.train.log_interval == 0:
                    self._log()
                self._dispatch("on_step_end")  # a guard may ask to roll the step back
                if self._rollback is not None:
                    self._roll_back(*self._rollback)
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
        self.record_outcome(outcome)
        return outcome.exit_code

    def record_outcome(self, outcome: Outcome) -> None:
        """Main rank: write RUN/status.json, which launchers read (a warning if the disk refuses it)."""
        self.outcome = outcome
        if not self.world.is_main:
            return
        try:
            self.run_dir.write_status(outcome, self.state.step, self.config.train.max_steps)
        except OSError as error:
            print(f"warning: {self.run_dir.status_file} not written: {error}", file=sys.stderr, flush=True)

    def _open_loader(self) -> None:
        """The data loader from the current cursor (the old one's workers shut down first)."""
        shutdown_loader_workers(self.__dict__.pop("_batches", None))
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

    def _seed_step(self) -> None:
        # Dropout randomness as a function of (seed, step, rank): a resumed run draws exactly what an
        # uninterrupted one would, whatever happened before the checkpoint.
        seed = int(np.random.SeedSequence([self.config.seed, self.state.step, self.world.rank]).generate_state(1)[0])
        torch.manual_seed(seed)

    def _train_step(self) -> None:
        self._seed_step()
        consumed: list[int] = []
        fault = self.faults.loss_multiplier(self.state.consumed_samples, self.layout.global_batch_size)
        step_loss = self.step.train(self._batches, consumed, fault)
        if self.trace.enabled:
            self.trace.append(self.state.step + 1, self.train_set.trace_labels(consumed))
        # Non-finite gradients make DeepSpeed skip the update (no weight, moment or schedule change);
        # a non-finite loss is what we count, and stop on when it persists.
        finite = bool(torch.isfinite(step_loss))
        nonfinite, loss_sum = self.all_reduce_sum([0.0 if finite else 1.0, float(step_loss) if finite else 0.0])
        loss_finite = nonfinite == 0.0
        self.last_loss = loss_sum / self.world.world_size if loss_finite else math.nan
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
            "rollbacks": self.state.rollbacks,
            "world_size": self.world.world_size,
            "peak_memory_mb": all_reduce_max(peak_memory_mb(self.world.device)),
        }
        self._interval_losses = []
        self._dispatch("on_log", metrics)

    # -------------------------------------------------------------------- what callbacks may ask for
    def request_stop(self, reason: str, *, requeue: bool = False, failed: bool = False) -> None:
        if self.outcome is None:
            self.outcome = Outcome("failed", reason) if failed else Outcome("stopped", reason, requeue)

    def request_rollback(self, reason: str, *, skip_batches: int) -> None:
        if self._rollback is None:
            self._rollback = (reason, skip_batches)

    def _data_order_at(self, saved: dict[str, Any], state: TrainerState, where: str) -> dict[str, Any] | None:
        """The data sources set to where checkpoint `saved` (trainer state `state`) left them; an imported model's
        checkpoint starts its data order. Returns the mixture entry this invocation starts or changes to."""
        if starts_its_data(saved):
            return self.sources.begin(self.config.seed)
        return self.sources.resume(
            saved, state.step, state.consumed_samples, self.config.data_reweight, self.config.seed, where
        )

    def _roll_back(self, reason: str, skip_batches: int) -> None:
        """Reload the last complete checkpoint in this process and skip data: the same state a resume from that
        checkpoint reaches, since the skip is written into it (bit-exact: engine, counters, data cursor and
        mixture, seeds). It loads through the resume's path (reshard.restore: a checkpoint of another layout,
        which the run resumed from, converts)."""
        self._rollback = None
        latest = self.checkpointer.latest()
        if latest is None:
            self.request_stop(f"{reason}: no checkpoint to roll back to", failed=True)
            return
        step, loss = self.state.step, self.last_loss
        saved = restore(self.checkpointer, self.step.engine, latest, self.config, self.world)
        state = TrainerState(**saved["trainer"])
        # The mixture as at the checkpoint (a reweight this invocation started there is applied again, from the
        # checkpoint's cursor): the skip below moves the cursor within it.
        self._data_order_at(saved, state, f"checkpoint {latest.path}")
        # At least every batch since the checkpoint: the one that spiked is never trained again.
        skipped = max(skip_batches, step - state.step) * self.layout.global_batch_size
        state.consumed_samples += skipped
        state.skipped_samples += skipped
        state.rollbacks = self.state.rollbacks + 1
        self.state, self._saved_step, self._interval_losses = state, state.step, []
        # The skip, and the mixture it skips in, go into the checkpoint: a later resume from it repeats both.
        amended = {"trainer": asdict(state), **self.sources.checkpoint_fields()}
        if problem := self.checkpointer.amend_state(latest, amended):
            print(f"warning: the data skip is not recorded in {latest.path}: {problem}", file=sys.stderr, flush=True)
        self.trace.truncate_after(state.step)
        self._open_loader()
        rollback = Rollback(step, state.step, reason, loss, skipped, state.rollbacks, saved.get("callbacks", {}))
        self._dispatch("on_rollback", rollback)

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any] | None:
        if not self.val_sets or self._rollback is not None:
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
        if self.state.step in (self._saved_step, self._unsaved_step) or self._rollback is not None:
            return None
        state = {
            "trainer": asdict(self.state),
            "callbacks": {c.state_key: c.state_dict() for c in self.callbacks if c.state_key},
            "tokenizer_sha256": self.manifest.tokenizer_sha256,
            "special_ids": self.manifest.special_ids,
            **self.sources.checkpoint_fields(),  # data_dir or data_dirs, and the mixture's run state
            "world_size": self.world.world_size,
            "zero_stage": self.config.zero_stage,
            "pipeline_stages": self.config.parallel.pipeline_stages,
            "weights_precision": weights_precision(self.config.precision),
            "config": to_container(self.config),
            # What a checkpoint needs to be used on its own (generate, evaluate, export): the model's shape with
            # its vocabulary, and the length of the sequences it was trained on.
            "model": asdict(self.model_config),
            "seq_len": self.manifest.seq_len,
            **({"imported_from": self.imported_from} if self.imported_from else {}),
        }
        try:
            checkpoint = self.checkpointer.save(self.step.engine, self.state.step, state, self.tokenizer)
        except CheckpointNotSaved as error:
            self._unsaved_step = self.state.step
            last = self.state.step >= self.config.train.max_steps or self.outcome is not None
            if self.config.checkpoint.on_failure == "continue" and not last:
                if self.world.is_main:
                    print(f"warning: {error}; training goes on, the next interval saves again", flush=True)
            else:
                self.outcome = Outcome("failed", str(error), user_error=True)
            return None
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
            if self._rollback is not None and hook == "on_step_end":
                break  # the step is undone: the callbacks after the one that asked do not see it
            getattr(callback, hook)(self, *args)

    def _print_end(self, outcome: Outcome) -> None:
        latest = self.checkpointer.latest()
        where = latest.path if latest else "none"
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
