"""`python -m pretrain.evaluate run_dir=RUN [text_file=PATH]`: loss, perplexity and bits per byte of a checkpoint.

Without `text_file`, the validation split of the run's dataset: the same first `eval.samples` samples, the
same token-weighted mean, so the loss equals the trainer's evaluation of that checkpoint. A run on a data
mixture is evaluated per source (one line each, as its val_loss/<source>) and over all sources (the
token-weighted mean, as its val_loss). With `text_file`,
any UTF-8 text, cleaned as data_prep cleans a document, tokenized with the run's tokenizer, preceded by EOS (a
document starts after EOS in training) and cut into windows of the run's training length that overlap by one
token, so every token after the first is predicted exactly once, as in the shards.

Bits per byte = total loss in nats / ln 2 / UTF-8 bytes of the predicted tokens: unlike per-token loss it
does not depend on the tokenizer, so models with different vocabularies compare. One process, CPU or GPU,
checkpoints of any ZeRO stage and pipeline layout (pretrain/core/trained_model.py).
"""

from __future__ import annotations

import gzip
import json
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.core.config_store import ConfigStore

from common.app import run_app
from common.errors import ConfigProblems, UserError
from data_prep.documents import CleanStats, clean_text, decode_utf8
from data_prep.manifest import MANIFEST_NAME, load_manifest
from pretrain.core.data import TokenSamples, build_index, eval_batches
from pretrain.core.mixture import source_name
from pretrain.core.model import GPT
from pretrain.core.scoring import loss_totals


@dataclass
class EvaluateConfig:
    # A run directory (its latest complete checkpoint is used) or an explicit checkpoint directory.
    run_dir: str | None = None
    checkpoint: str | None = None
    # Evaluate this UTF-8 text file (.gz too) instead of the validation shards.
    text_file: str | None = None
    # The dataset whose validation split is evaluated; unset: the run's data_dir (or each source of its data
    # mixture), as recorded in the checkpoint.
    data_dir: str | None = None
    # Validation samples evaluated (the split's first ones); unset: the run's eval.samples, the set its
    # training-time evaluations used.
    samples: int | None = None
    # Tokens per window of a text file; unset: the sequence length the run trained on.
    context: int | None = None
    # Sequences per forward pass.
    batch_size: int = 8
    # "auto": CUDA when available, else CPU.
    device: str = "auto"
    # Also write the results as JSON to this file.
    output: str | None = None

    def problems(self) -> ConfigProblems:
        problems = ConfigProblems()
        problems.check(self.samples is None or self.samples >= 1, "samples", self.samples, "must be >= 1")
        problems.check(self.context is None or self.context >= 1, "context", self.context, "must be >= 1")
        problems.check(self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1")
        problems.check(
            not (self.text_file and (self.data_dir or self.samples)),
            "text_file",
            self.text_file,
            "evaluates a text file; data_dir and samples select validation shards: give one or the other",
        )
        return problems


@dataclass
class Evaluation:
    """Totals over the evaluated tokens; the derived figures are properties so they always agree."""

    source: str
    sequences: int
    tokens: int
    bytes: int
    total_loss: float  # nats, summed over tokens

    @property
    def loss(self) -> float:
        return self.total_loss / self.tokens if self.tokens else float("nan")

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 50.0))

    @property
    def bits_per_byte(self) -> float:
        return self.total_loss / math.log(2) / self.bytes if self.bytes else float("nan")

    def summary(self) -> str:
        return (
            f"{self.source}: {self.sequences:,} sequences, {self.tokens:,} tokens, {self.bytes:,} bytes | "
            f"loss {self.loss:.4f} | perplexity {self.perplexity:.2f} | bits/byte {self.bits_per_byte:.4f}"
        )

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "loss": self.loss, "perplexity": self.perplexity, "bits_per_byte": self.bits_per_byte}

    @classmethod
    def combined(cls, source: str, parts: list[Evaluation]) -> Evaluation:
        """The evaluation of all parts' tokens together: the token-weighted mean of their losses."""
        return cls(
            source,
            sum(p.sequences for p in parts),
            sum(p.tokens for p in parts),
            sum(p.bytes for p in parts),
            sum(p.total_loss for p in parts),
        )


# A batch: input ids (B, T), targets (B, T), segment ids (B, T) or None, weights (B,): 1 real, 0 padding.
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]


@torch.no_grad()
def score(model: GPT, batches: Iterator[Batch], byte_lengths: np.ndarray, source: str) -> Evaluation:
    device = next(model.parameters()).device
    table = torch.from_numpy(byte_lengths)
    totals = torch.zeros(2, dtype=torch.float64)  # the trainer's evaluation totals (scoring.py)
    byte_count, sequences = 0, 0
    for input_ids, targets, segment_ids, weights in batches:
        losses = model(
            input_ids.to(device),
            targets.to(device),
            segment_ids.to(device) if segment_ids is not None else None,
            reduction="none",
        ).view(len(weights), -1)  # (B, T)
        totals += loss_totals(losses, weights)
        byte_count += int((table[targets].sum(dim=1) * weights.long()).sum())
        sequences += int(weights.sum())
    return Evaluation(source, sequences, int(totals[1]), byte_count, float(totals[0]))


def shard_batches(data_dir: Path, samples: int, batch_size: int, doc_mask: bool) -> Iterator[Batch]:
    manifest = load_manifest(data_dir)
    split = manifest.splits.get("val")
    if split is None or not split.samples:
        raise UserError(f"data_dir={str(data_dir)!r} has no validation samples; evaluate a text_file=PATH instead")
    # No index cache: the run directory may be read-only, and the validation split is small.
    dataset = TokenSamples(build_index(data_dir, manifest, "val", None), manifest.seq_len)
    for batch, weights in eval_batches(dataset, samples, batch_size, rank=0, world=1):
        yield batch["input_ids"], batch["targets"], batch["segment_ids"] if doc_mask else None, weights


def read_text(path: Path) -> str:
    """The file's text, cleaned as data_prep cleans a document (line endings, invalid UTF-8, "▁", BOM)."""
    if not path.is_file():
        raise UserError(f"text_file={str(path)!r} not found")
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    text, _ = decode_utf8(raw)
    cleaned = clean_text(text, CleanStats())
    if cleaned is None:
        raise UserError(f"text_file={str(path)!r} holds no text")
    return cleaned


def text_windows(ids: list[int], context: int, batch_size: int) -> Iterator[Batch]:
    """Windows of context + 1 tokens overlapping by one: each id after the first is a target exactly once."""
    windows = [ids[start : start + context + 1] for start in range(0, len(ids) - 1, context)]
    # Full windows batch together; the shorter last one goes alone.
    groups: list[list[list[int]]] = []
    for window in windows:
        if groups and len(groups[-1]) < batch_size and len(groups[-1][0]) == len(window):
            groups[-1].append(window)
        else:
            groups.append([window])
    for group in groups:
        tokens = torch.tensor(group, dtype=torch.long)  # (B, T + 1)
        yield tokens[:, :-1], tokens[:, 1:], None, torch.ones(len(group))


def evaluate(config: EvaluateConfig) -> tuple[Evaluation, dict[str, Any]]:
    """The evaluation (over all sources of a mixture), and what describes it: checkpoint, step, data or text;
    for a mixture, `sources` holds each source's evaluation."""
    from pretrain.core.trained_model import load_trained_model, training_data_dirs

    text = read_text(Path(config.text_file)) if config.text_file else None  # a bad path fails before loading
    loaded = load_trained_model(config.run_dir, config.checkpoint, config.device)
    model, tokenizer, state = loaded.model, loaded.tokenizer, loaded.state
    byte_lengths = tokenizer.byte_lengths()
    info: dict[str, Any] = {"checkpoint": str(loaded.checkpoint.path), "step": state["trainer"]["step"]}
    if text is not None:
        context = config.context or loaded.seq_len
        if context > model.config.max_seq_len:
            raise UserError(f"context={context} exceeds the model's max_seq_len={model.config.max_seq_len}")
        ids = [tokenizer.eos_id, *tokenizer.encode(text)]
        batches = text_windows(ids, context, config.batch_size)
        result = score(model, batches, byte_lengths, f"text {config.text_file}")
        return result, {**info, "context": context, "text_file": config.text_file}
    data_dirs = [config.data_dir] if config.data_dir else training_data_dirs(state)
    if not data_dirs:
        raise UserError(
            f"{loaded.checkpoint.path} was imported and trained on no dataset: give text_file=F or data_dir=D"
        )
    samples = config.samples or int(state["config"]["eval"]["samples"])
    parts = []
    for data_dir in map(Path, data_dirs):
        check_dataset(data_dir, state, model.config.max_seq_len)
        batches = shard_batches(data_dir, samples, config.batch_size, model.config.doc_mask)
        parts.append(score(model, batches, byte_lengths, f"val split of {data_dir}"))
    info["samples"] = samples
    if len(parts) == 1:  # a run on one dataset, or one dataset asked for (data_dir=)
        return parts[0], {**info, "data_dir": data_dirs[0]}
    info["data_dirs"] = data_dirs
    info["sources"] = {source_name(d): part for d, part in zip(data_dirs, parts, strict=True)}
    return Evaluation.combined(f"all {len(parts)} sources", parts), info


def check_dataset(data_dir: Path, state: dict[str, Any], max_seq_len: int) -> None:
    if not (data_dir / MANIFEST_NAME).is_file():
        raise UserError(
            f"the run's dataset {str(data_dir)!r} is not there (no {MANIFEST_NAME}); give data_dir=PATH or text_file=PATH"
        )
    manifest = load_manifest(data_dir)
    if manifest.tokenizer_sha256 != state.get("tokenizer_sha256"):
        raise UserError(f"data_dir={str(data_dir)!r} was tokenized with another tokenizer than the run's")
    if manifest.seq_len > max_seq_len:
        raise UserError(f"data_dir={str(data_dir)!r} has seq_len {manifest.seq_len} > max_seq_len of the model")


def run(config: EvaluateConfig) -> int:
    config.problems().raise_if_any()
    started = time.perf_counter()
    if config.output and not Path(config.output).parent.is_dir():
        raise UserError(f"output={config.output!r}: its directory does not exist")
    result, info = evaluate(config)
    print(f"# checkpoint {info['checkpoint']} (step {info['step']})", file=sys.stderr, flush=True)
    sources: dict[str, Evaluation] = info.pop("sources", {})
    for part in sources.values():
        print(part.summary(), flush=True)
    print(result.summary(), flush=True)
    if config.output:
        payload = {**info, **result.as_dict(), "seconds": time.perf_counter() - started}
        if sources:
            payload["sources"] = {name: part.as_dict() for name, part in sources.items()}
        try:
            Path(config.output).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        except OSError as error:
            raise UserError(f"output={config.output!r} cannot be written: {error.strerror}") from None
    return 0


def main() -> None:
    ConfigStore.instance().store(name="evaluate_schema", node=EvaluateConfig)
    run_app("evaluate", run)


if __name__ == "__main__":
    main()
