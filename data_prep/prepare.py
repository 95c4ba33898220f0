"""`python -m data_prep`: raw text -> SentencePiece -> packed WebDataset shards -> manifest.json.

The run, in order:
1. find the inputs (and fetch a named corpus); fingerprint them with the settings that shape the output;
2. compare with an existing manifest: the same fingerprint is a no-op, a different one is refused unless
   `overwrite=true`;
3. train the tokenizer on a bounded sample of the training split (pass 1), unless one is given; it is kept
   in `<output_dir>/.data_prep/` so that a rerun after a crash does not train it again;
4. clean, split, tokenize (in parallel) and pack into shards (pass 2);
5. copy the tokenizer and write the manifest last, so a manifest never points at a partial shard.
"""

from __future__ import annotations

import errno
import hashlib
import heapq
import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tqdm import tqdm

from common.app import to_container
from common.errors import UserError
from common.files import write_bytes_atomic
from data_prep.config import PrepConfig
from data_prep.corpus import fetch_corpus
from data_prep.documents import SPLIT_NAMES, SPLIT_TRAIN, SPLIT_VAL, CleanStats
from data_prep.encode import WorkerSettings, encode_task, ordered_map, sample_task
from data_prep.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    TOKENIZER_NAME,
    Manifest,
    SplitInfo,
    load_manifest,
    verify_shards,
    write_manifest,
)
from data_prep.packing import Packer, ShardWriter, token_dtype
from data_prep.sources import InputFile, ReadReport, discover, iter_tasks
from data_prep.tokenizer import TokenizerInfo, info_from_proto, load_tokenizer, train_tokenizer

WORK_DIR = ".data_prep"
# Settings that do not change the output, left out of the fingerprint (so changing them is still a no-op).
_NOT_FINGERPRINTED = ("output_dir", "num_workers", "overwrite", "task_mb")


def _fingerprint(config: PrepConfig, files: list[InputFile], tokenizer: TokenizerInfo | None) -> str:
    settings = {k: v for k, v in to_container(config).items() if k not in _NOT_FINGERPRINTED}
    settings.pop("corpus", None)  # the files it brings are fingerprinted below
    payload = {
        "format_version": FORMAT_VERSION,
        "settings": settings,
        "files": [(f.path, f.size, f.mtime_ns) for f in files],
        "tokenizer_sha256": tokenizer.sha256 if tokenizer else None,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".data_prep.write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise UserError(
            f"output_dir={str(out)!r} is not writable ({error.strerror or error}); choose a directory you can write"
        ) from None


def _existing_dataset(out: Path) -> dict[str, Any] | None:
    path = out / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _remove_dataset(out: Path, manifest: dict[str, Any]) -> None:
    # The manifest goes first, so that at no moment does a manifest point at a shard being replaced.
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    for split in (manifest.get("splits") or {}).values():
        for shard in split.get("shards", []):
            (out / shard["name"]).unlink(missing_ok=True)
    for stale in [*out.glob("train-*.tar"), *out.glob("val-*.tar")]:
        stale.unlink()
    (out / TOKENIZER_NAME).unlink(missing_ok=True)


def _sample_lines(
    config: PrepConfig, files: list[InputFile], settings: WorkerSettings, report: ReadReport
) -> tuple[list[str], int]:
    """Pass 1: the bottom-k sample of training-split lines (deduplicated documents only), in key order, and
    how many distinct non-empty documents were read."""
    k = config.tokenizer.sample_lines
    heap: list[tuple[int, str]] = []  # max-heap by key, through negated keys
    seen: set[bytes] = set()
    tasks = iter_tasks(files, int(config.task_mb * 1e6), report)
    bar = tqdm(desc="sample", unit="B", unit_scale=True, disable=None, total=_plain_bytes(files))
    for nbytes, result in ordered_map(sample_task, tasks, config.workers, settings):
        for document in result.documents:
            if document.digest in seen:
                continue
            seen.add(document.digest)
            for key, line in document.lines:
                if len(heap) < k:
                    heapq.heappush(heap, (-key, line))
                elif -heap[0][0] > key:
                    heapq.heapreplace(heap, (-key, line))
        bar.update(nbytes)
    bar.close()
    return [line for _, line in sorted(heap, key=lambda item: -item[0])], len(seen)


def _plain_bytes(files: list[InputFile]) -> int | None:
    # Progress in uncompressed bytes: the total is known only when no input is compressed.
    return None if any(f.path.endswith(".gz") for f in files) else sum(f.size for f in files)


def _obtain_tokenizer(
    config: PrepConfig, files: list[InputFile], settings: WorkerSettings, work: Path, fingerprint: str
) -> TokenizerInfo:
    cached = work / f"tokenizer-{fingerprint[:16]}.model"
    if cached.is_file():
        print(f"reusing the tokenizer trained by an interrupted run ({cached})", flush=True)
        return info_from_proto(cached.read_bytes())
    started = time.perf_counter()
    report = ReadReport()
    lines, documents = _sample_lines(config, files, settings, report)
    if not documents:
        skipped = [*report.binary_files, *report.unreadable_files]
        raise UserError(
            f"input: the corpus is empty after cleaning ({len(files)} files read, {len(skipped)} skipped as "
            f"binary or unreadable{': ' + ', '.join(skipped[:3]) if skipped else ''}); point input=[...] at "
            "text files with content"
        )
    if not lines:
        raise UserError(
            f"val_fraction={config.val_fraction}: all {documents} documents went to the validation split, "
            "so the training split is empty; lower val_fraction or split_passage_chars, or add text"
        )
    info = train_tokenizer(lines, config.tokenizer, config.workers)
    write_bytes_atomic(cached, info.proto)
    print(
        f"tokenizer: trained {config.tokenizer.model_type} vocab {info.vocab_size} on {len(lines)} sampled lines "
        f"in {time.perf_counter() - started:.1f} s",
        flush=True,
    )
    return info


def _sample_bytes(seq_len: int, itemsize: int) -> int:
    # Per sample: two tar headers (512 B each), two npy payloads (128 B header + data), padded to 512 B.
    def padded(n: int) -> int:
        return -(-n // 512) * 512

    return 2 * 512 + padded(128 + (seq_len + 1) * itemsize) + padded(128 + 64)


def prepare(config: PrepConfig) -> int:
    config.problems().raise_if_any()
    started = time.perf_counter()
    patterns = list(config.input)
    if config.corpus is not None:
        patterns.append(str(fetch_corpus(config.corpus)))
    files = discover(patterns)
    out = Path(config.output_dir)
    _check_writable(out)
    reused = load_tokenizer(config.tokenizer) if config.tokenizer.model_path else None
    fingerprint = _fingerprint(config, files, reused)

    existing = _existing_dataset(out)
    if existing is not None:
        if existing.get("fingerprint") == fingerprint:
            manifest = load_manifest(out)
            if not verify_shards(out, manifest, check_hash=False):
                print(
                    f"{out}: up to date, nothing to do ({manifest.tokens} tokens in "
                    f"{sum(len(s.shards) for s in manifest.splits.values())} shards from the same inputs and "
                    "settings); check it with `python -m data_prep.inspect_dataset`",
                    flush=True,
                )
                return 0
        elif not config.overwrite:
            raise UserError(
                f"output_dir={str(out)!r} holds a different dataset (its manifest.json comes from other inputs "
                "or settings); choose another output_dir, or pass overwrite=true to replace it"
            )
        _remove_dataset(out, existing)
    elif list(out.glob("train-*.tar")) or list(out.glob("val-*.tar")):
        if not (out / WORK_DIR).is_dir() and not config.overwrite:
            raise UserError(
                f"output_dir={str(out)!r} holds shards but no manifest.json, and not from an interrupted run of "
                "data_prep; choose another output_dir, or pass overwrite=true to replace them"
            )
        _remove_dataset(out, {})  # shards of an interrupted run: rewritten from the start

    work = out / WORK_DIR
    work.mkdir(exist_ok=True)
    for stale in out.glob(".*.tar.tmp"):
        stale.unlink()  # a partial shard of an interrupted run

    settings = WorkerSettings(
        text_field=config.text_field,
        passage_chars=config.split_passage_chars,
        val_fraction=config.val_fraction,
        sample_lines=config.tokenizer.sample_lines,
        max_line_bytes=config.tokenizer.max_line_bytes,
        seed=config.tokenizer.seed,
    )
    tokenizer = reused or _obtain_tokenizer(config, files, settings, work, fingerprint)
    settings = WorkerSettings(**{**asdict(settings), "tokenizer_proto": tokenizer.proto})

    dtype = token_dtype(tokenizer.vocab_size)
    per_shard = max(1, int(config.shard_size_mb * 1e6) // _sample_bytes(config.seq_len, dtype.itemsize))
    writers = [ShardWriter(out, name, per_shard) for name in SPLIT_NAMES]
    packers = [Packer(config.seq_len, tokenizer.eos_id, dtype, writer) for writer in writers]
    stats, report = CleanStats(), ReadReport()
    seen: set[bytes] = set()
    documents_read = duplicates = 0
    encode_started = time.perf_counter()
    bar = tqdm(desc="encode", unit="B", unit_scale=True, disable=None, total=_plain_bytes(files))
    try:
        tasks = iter_tasks(files, int(config.task_mb * 1e6), report)
        for nbytes, result in ordered_map(encode_task, tasks, config.workers, settings):
            for key, value in asdict(result.stats).items():
                setattr(stats, key, getattr(stats, key) + value)
            for document in result.documents:
                documents_read += 1
                if document.digest in seen:
                    duplicates += 1
                    continue
                seen.add(document.digest)
                for split, tokens in document.runs:
                    packers[split].add(tokens)
            bar.update(nbytes)
            elapsed = max(time.perf_counter() - encode_started, 1e-9)
            bar.set_postfix(tokens_per_s=f"{sum(p.tokens for p in packers) / elapsed:,.0f}", refresh=False)
        for writer in writers:
            writer.close()
        bar.close()
        _check_output(config, packers, files, report, stats)
    except OSError as error:
        _discard(out, writers)
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(
                f"disk full while writing shards to output_dir={str(out)!r}; free space there or choose "
                "another output_dir, then run the same command again"
            ) from None
        raise
    except BaseException:
        _discard(out, writers)
        raise
    encode_seconds = time.perf_counter() - encode_started

    write_bytes_atomic(out / TOKENIZER_NAME, tokenizer.proto)
    splits = {
        name: SplitInfo(
            shards=list(writer.shards),
            samples=writer.samples_written,
            tokens=packer.tokens,
            documents=packer.documents,
            tail_tokens_dropped=packer.tail_tokens,
        )
        for name, writer, packer in zip(SPLIT_NAMES, writers, packers, strict=True)
    }
    total_tokens = sum(p.tokens for p in packers)
    manifest = Manifest(
        format_version=FORMAT_VERSION,
        seq_len=config.seq_len,
        dtype=dtype.name,
        vocab_size=tokenizer.vocab_size,
        special_ids={
            "unk": tokenizer.unk_id,
            "bos": tokenizer.bos_id,
            "eos": tokenizer.eos_id,
            "pad": tokenizer.pad_id,
        },
        tokenizer_file=TOKENIZER_NAME,
        tokenizer_sha256=tokenizer.sha256,
        splits=splits,
        documents=len(seen),
        tokens=total_tokens,
        cleaning={
            "documents_read": documents_read,
            "duplicates_removed": duplicates,
            **asdict(stats),
            "binary_files_skipped": report.binary_files,
            "unreadable_files_skipped": report.unreadable_files,
        },
        fingerprint=fingerprint,
        inputs={
            "patterns": [str(p) for p in patterns],
            "files": len(files),
            "bytes": sum(f.size for f in files),
        },
        config=to_container(config),
    )
    write_manifest(out, manifest)
    shutil.rmtree(out / WORK_DIR, ignore_errors=True)
    _print_summary(out, manifest, report, time.perf_counter() - started, encode_seconds)
    return 0


def _check_output(
    config: PrepConfig, packers: list[Packer], files: list[InputFile], report: ReadReport, stats: CleanStats
) -> None:
    if sum(p.documents for p in packers) == 0:
        skipped = len(report.binary_files) + len(report.unreadable_files)
        raise UserError(
            f"input: the corpus is empty after cleaning ({len(files)} files, {skipped} skipped as binary or "
            f"unreadable, {stats.empty_documents} empty documents, {stats.invalid_json_lines} unusable JSON "
            "lines); point input=[...] at text with content"
        )
    train, val = packers[SPLIT_TRAIN], packers[SPLIT_VAL]
    if train.writer.samples_written == 0:
        raise UserError(
            f"seq_len={config.seq_len}: the training split has only {train.tokens} tokens, fewer than one sample "
            f"of seq_len + 1; lower seq_len or add text"
        )
    if config.val_fraction > 0 and val.writer.samples_written == 0:
        raise UserError(
            f"val_fraction={config.val_fraction}: the validation split got {val.tokens} tokens, fewer than one "
            f"sample of seq_len + 1 = {config.seq_len + 1}; raise val_fraction, lower split_passage_chars or "
            "seq_len, or add text"
        )


def _discard(out: Path, writers: list[ShardWriter]) -> None:
    """After a failure: no partial shard, and no shard of this run left to look like a dataset."""
    for writer in writers:
        writer.abort()
        for record in writer.shards:
            (out / record.name).unlink(missing_ok=True)


def _print_summary(out: Path, manifest: Manifest, report: ReadReport, seconds: float, encode_seconds: float) -> None:
    cleaning = manifest.cleaning
    lines = [
        f"prepared {out}: {manifest.documents} documents, {manifest.tokens:,} tokens, "
        + ", ".join(
            f"{name} {info.samples} samples in {len(info.shards)} shards" for name, info in manifest.splits.items()
        ),
        f"  {seconds:.1f} s in all, encoding {encode_seconds:.1f} s at {manifest.tokens / max(encode_seconds, 1e-9):,.0f}"
        " tokens/s",
        f"  cleaning: {cleaning['duplicates_removed']} duplicates removed, {cleaning['empty_documents']} empty "
        f"dropped, {cleaning['invalid_utf8_replaced']} invalid UTF-8 sequences replaced, "
        f"{cleaning['invalid_json_lines']} unusable JSON lines",
    ]
    for path in report.binary_files:
        lines.append(f"  skipped binary file: {path}")
    for entry in report.unreadable_files:
        lines.append(f"  skipped unreadable file: {entry}")
    print("\n".join(lines), flush=True)
