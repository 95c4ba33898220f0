"""Stage 4, merge (one job, after every slice is encoded): number the slices' shards in order, move them into
`<output_dir>`, copy the tokenizer, write the manifest last, and remove the work directory.

Renaming is all the data movement there is, so the merge takes seconds whatever the corpus size. A merge
killed midway is finished by a rerun: a shard already moved is recognized by its place and size.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from common.errors import UserError
from common.files import fsync_dir, write_bytes_atomic
from data_prep.config import PrepConfig
from data_prep.documents import SPLIT_NAMES, SPLIT_TRAIN, SPLIT_VAL
from data_prep.manifest import FORMAT_VERSION, Manifest, ShardInfo, SplitInfo, write_manifest
from data_prep.packing import shard_name, token_dtype
from data_prep.plan import planned_tokenizer
from data_prep.workdir import RunSpec, WorkDir


def run_merge(work: WorkDir, spec: RunSpec, config: PrepConfig) -> Manifest:
    plan = work.read_plan()
    results = [work.read_slice(number) for number in range(len(spec.slices))]
    missing = [number for number, result in enumerate(results) if result is None]
    if plan is None or missing:
        raise UserError(
            f"the encoding of {len(missing)} slice(s) ({', '.join(map(str, missing[:5]))}) is not finished: a task "
            "did not complete; run the same command again to finish it"
        )
    done: list[dict[str, Any]] = [result for result in results if result is not None]
    splits = {name: _totals(done, name) for name in SPLIT_NAMES}
    _check_output(work, config, splits)
    for name in SPLIT_NAMES:
        splits[name].shards = _move_shards(work, done, name)
    fsync_dir(work.out)
    tokenizer = planned_tokenizer(work)
    write_bytes_atomic(work.out / tokenizer.file_name, tokenizer.data)
    manifest = Manifest(
        format_version=FORMAT_VERSION,
        seq_len=config.seq_len,
        dtype=token_dtype(tokenizer.vocab_size).name,
        vocab_size=tokenizer.vocab_size,
        special_ids=tokenizer.special_ids,
        tokenizer_file=tokenizer.file_name,
        tokenizer_sha256=tokenizer.sha256,
        splits=splits,
        documents=plan["documents"],
        tokens=sum(split.tokens for split in splits.values()),
        cleaning=plan["cleaning"],
        fingerprint=spec.fingerprint,
        inputs={
            "patterns": spec.patterns,
            "files": len(spec.files),
            "bytes": sum(f.size for f in spec.files),
            "slices": len(spec.slices),
        },
        config=spec.config,
    )
    write_manifest(work.out, manifest)
    work.remove()
    return manifest


def _totals(done: list[dict[str, Any]], name: str) -> SplitInfo:
    return SplitInfo(
        shards=[],
        samples=sum(result[name]["samples"] for result in done),
        tokens=sum(result[name]["tokens"] for result in done),
        documents=sum(result[name]["documents"] for result in done),
        tail_tokens_dropped=sum(result[name]["tail_tokens_dropped"] for result in done),
    )


def _move_shards(work: WorkDir, done: list[dict[str, Any]], name: str) -> list[ShardInfo]:
    moved: list[ShardInfo] = []
    for number, result in enumerate(done):
        for shard in result[name]["shards"]:
            source = work.slice_dir(number) / shard["name"]
            target = work.out / shard_name(name, len(moved))
            if source.is_file():
                os.replace(source, target)
            elif not (target.is_file() and target.stat().st_size == shard["bytes"]):
                raise UserError(
                    f"shard {source} is missing (and not yet moved to {target.name}); prepare the dataset again with "
                    "overwrite=true"
                )
            moved.append(ShardInfo(target.name, shard["samples"], shard["bytes"], shard["sha256"]))
    return moved


def _check_output(work: WorkDir, config: PrepConfig, splits: dict[str, SplitInfo]) -> None:
    """Refuse a dataset that could not train; its work is of no use to a rerun, so it is removed."""
    train, val = splits[SPLIT_NAMES[SPLIT_TRAIN]], splits[SPLIT_NAMES[SPLIT_VAL]]
    problem = None
    if train.samples == 0:
        problem = (
            f"seq_len={config.seq_len}: the training split has only {train.tokens} tokens, fewer than one sample "
            "of seq_len + 1 in any slice; lower seq_len or add text"
        )
    elif config.val_fraction > 0 and val.samples == 0:
        problem = (
            f"val_fraction={config.val_fraction}: the validation split got {val.tokens} tokens, fewer than one "
            f"sample of seq_len + 1 = {config.seq_len + 1} in any slice; raise val_fraction, lower "
            "split_passage_chars or seq_len, raise slice_mb, or add text"
        )
    if problem is not None:
        work.remove()
        raise UserError(problem)


def print_summary(out: Path, manifest: Manifest, stages: dict[str, float]) -> None:
    """The run's result; `stages`: seconds per stage this process saw (a Slurm merge job: only its own)."""
    cleaning = manifest.cleaning
    encode = stages.get("encode")
    lines = [
        f"prepared {out}: {manifest.documents} documents, {manifest.tokens:,} tokens, "
        + ", ".join(
            f"{name} {info.samples} samples in {len(info.shards)} shards" for name, info in manifest.splits.items()
        ),
        f"  {sum(stages.values()):.1f} s in all ("
        + ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in stages.items())
        + ")"
        + (f"; encoding at {manifest.tokens / max(encode, 1e-9):,.0f} tokens/s" if encode else ""),
        f"  cleaning: {cleaning['duplicates_removed']} duplicates removed, {cleaning['empty_documents']} empty "
        f"dropped, {cleaning['undecodable_replaced']} undecodable sequences replaced, "
        f"{cleaning['invalid_json_lines']} unusable JSON lines",
        "  encodings: " + ", ".join(f"{name} {count} files" for name, count in cleaning["encodings"].items()),
    ]
    for path in cleaning["binary_files_skipped"]:
        lines.append(f"  skipped binary file: {path}")
    for entry in cleaning["unreadable_files_skipped"]:
        lines.append(f"  skipped unreadable file: {entry}")
    print("\n".join(lines), flush=True)
