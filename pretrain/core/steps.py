"""What one training step and one evaluation pass do to the model: one interface, two layouts.

The loop in trainer.py never asks which layout it runs. `PlainStep` drives a DeepSpeed engine over the plain
GPT (any ZeRO stage): forward, backward and step per micro-batch, DeepSpeed applying the optimizer at the
accumulation boundary. `PipelineStep` hands the whole global batch to DeepSpeed's pipeline schedule, which runs
every micro-batch through the stages and broadcasts the last stage's loss. Both are built where the engine is
built (engine.py::build_train_step), and both own their micro-batch loop, their evaluation pass and the fault
injection of a NaN or spiking loss (tests: faults.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, Protocol

import torch

from pretrain.core.data import Batch
from pretrain.core.scoring import loss_totals

# One evaluation batch: the collated batch and the weight of each sample (1 real, 0 padding).
EvalBatch = tuple[Batch, torch.Tensor]


class TrainStep(Protocol):
    engine: Any  # the DeepSpeed engine: checkpoints save and load through it
    data_parallel_rank: int
    data_parallel_size: int

    def train(self, batches: Iterator[Batch], consumed: list[int], loss_multiplier: float = 1.0) -> torch.Tensor:
        """One optimizer step over the global batch, reading this rank's micro-batches from `batches` and adding
        the sample numbers it trained on to `consumed`; returns the step's mean loss (a 0-d float tensor).
        `loss_multiplier` is fault injection (NaN, or a spike); 1.0 in normal runs."""
        ...

    def evaluate(self, batches: list[EvalBatch]) -> torch.Tensor:
        """[sum of token losses, tokens] over this rank's share of the validation batches (float64, CPU)."""
        ...

    def lr(self) -> float: ...

    def grad_norm(self) -> float:
        """The global gradient norm before clipping of the last applied step (NaN when unknown)."""
        ...

    def step_applied(self) -> bool:
        """Whether the last step changed the weights (False when DeepSpeed skipped it: non-finite gradients)."""
        ...


class _EngineStep:
    def __init__(self, engine: Any, scheduler: Any, data_parallel_rank: int, data_parallel_size: int) -> None:
        self.engine = engine
        self.scheduler = scheduler
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def grad_norm(self) -> float:
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def step_applied(self) -> bool:
        return bool(self.engine.was_step_applied())


class PlainStep(_EngineStep):
    def __init__(
        self,
        engine: Any,
        scheduler: Any,
        accumulation_steps: int,
        device: torch.device,
        doc_mask: bool,
        data_parallel_rank: int,
        data_parallel_size: int,
    ) -> None:
        super().__init__(engine, scheduler, data_parallel_rank, data_parallel_size)
        self.accumulation_steps = accumulation_steps
        self.device = device
        self.doc_mask = doc_mask

    def _inputs(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        device = self.device
        segments = batch["segment_ids"].to(device, non_blocking=True) if self.doc_mask else None
        return (
            batch["input_ids"].to(device, non_blocking=True),
            batch["targets"].to(device, non_blocking=True),
            segments,
        )

    def train(self, batches: Iterator[Batch], consumed: list[int], loss_multiplier: float = 1.0) -> torch.Tensor:
        self.engine.train()
        losses = []
        for micro_step in range(self.accumulation_steps):
            batch = next(batches)
            consumed += batch["indices"].tolist()
            loss = self.engine(*self._inputs(batch))
            if loss_multiplier != 1.0 and micro_step == 0:  # NaN != 1.0 too
                loss = loss * loss_multiplier
            losses.append(loss.detach().float())
            self.engine.backward(loss)
            self.engine.step()  # DeepSpeed applies the optimizer only at the accumulation boundary
        return torch.stack(losses).mean()

    @torch.no_grad()
    def evaluate(self, batches: list[EvalBatch]) -> torch.Tensor:
        self.engine.eval()
        total = torch.zeros(2, dtype=torch.float64)
        for batch, weights in batches:
            token_losses = self.engine(*self._inputs(batch), reduction="none").view(len(weights), -1)
            total += loss_totals(token_losses, weights)
        self.engine.train()
        return total


class PipelineStep(_EngineStep):
    def __init__(
        self,
        engine: Any,
        scheduler: Any,
        micro_batch_size: int,
        seq_len: int,
        data_parallel_rank: int,
        data_parallel_size: int,
    ) -> None:
        super().__init__(engine, scheduler, data_parallel_rank, data_parallel_size)
        self.micro_batch_size = micro_batch_size
        self.seq_len = seq_len
        self.loss_fn = engine.module.loss_fn  # pipeline_model.PipelineLoss: the last stage computes the loss

    def train(self, batches: Iterator[Batch], consumed: list[int], loss_multiplier: float = 1.0) -> torch.Tensor:
        first_stage = self.engine.is_first_stage()

        def micro_batches() -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
            while True:
                batch = next(batches)
                if first_stage:  # the first and last stage both read the batch: count it once
                    consumed.extend(batch["indices"].tolist())
                yield batch["input_ids"], batch["targets"]

        self.engine.train()
        self.loss_fn.multiplier = loss_multiplier
        try:
            return self.engine.train_batch(data_iter=iter(micro_batches())).detach().float().cpu()
        finally:
            self.loss_fn.multiplier = 1.0

    @torch.no_grad()
    def evaluate(self, batches: list[EvalBatch]) -> torch.Tensor:
        """Padding samples get targets of -100, which the pipeline's loss ignores: it returns the real tokens'
        loss sum over all positions, averaged over micro-batches, on every stage of the pipeline."""
        inputs = []
        for batch, weights in batches:
            targets = batch["targets"].clone()
            targets[weights == 0] = -100
            inputs.append((batch["input_ids"], targets))
        self.engine.eval()
        mean = self.engine.eval_batch(iter(inputs), num_micro_batches=len(inputs), bcast_loss=True)
        self.engine.train()
        if not self.engine.is_first_stage():
            # Every stage holds the same figures after the broadcast: count each data-parallel replica once.
            return torch.zeros(2, dtype=torch.float64)
        positions = len(inputs) * self.micro_batch_size * self.seq_len
        real = sum(float(w.sum()) for _, w in batches) * self.seq_len
        return torch.tensor([float(mean) * positions, real], dtype=torch.float64)
