"""Stage 2, plan (one job, after every slice is scanned): decide what is encoded, and with which tokenizer.

- Exact deduplication across the whole corpus: a document is kept where its content first occurs (in slice
  order, then reading order), whichever task scanned it, so any number of tasks keeps the same documents.
  The plan holds 16 bytes per document (plus NumPy's sort) while it decides: about 3 GB for 100 M documents.
- The tokenizer: tokenizer.model_path or hf_path's tokenizer.json copied in, or SentencePiece trained on the
  merged sample. Written before the plan's marker, so a plan killed after training reuses it; the plan records
  its file name and special ids (a Hugging Face tokenizer's EOS is named by files beside it, not in it).
- Totals of the scan (cleaning statistics, encodings, skipped files) for the manifest.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import numpy as np

from common.errors import UserError
from common.files import write_bytes_atomic, write_json_atomic
from common.tokenizer_files import is_hf_tokenizer
from data_prep.config import PrepConfig
from data_prep.documents import CleanStats
from data_prep.hf_tokenizer import hf_info, load_hf_tokenizer
from data_prep.sample import merge_samples
from data_prep.tokenizer import TokenizerInfo, info_from_proto, load_tokenizer, train_tokenizer
from data_prep.workdir import RunSpec, WorkDir


def run_plan(work: WorkDir, spec: RunSpec, config: PrepConfig, threads: int) -> dict[str, Any]:
    """The plan (computed once; a rerun reads it back)."""
    existing = work.read_plan()
    if existing is not None:
        return existing
    scans = [work.read_scan(number) for number in range(len(spec.slices))]
    missing = [number for number, scan in enumerate(scans) if scan is None]
    if missing:
        raise UserError(
            f"the scan of {len(missing)} slice(s) ({', '.join(map(str, missing[:5]))}) is missing: a scan task did "
            "not finish; run the same command again to finish it"
        )
    totals = _totals([scan for scan in scans if scan is not None])
    kept = _deduplicate(work, len(spec.slices))
    totals["duplicates_removed"] = totals["documents_read"] - kept
    if kept == 0:
        skipped = [*totals["binary_files_skipped"], *totals["unreadable_files_skipped"]]
        raise UserError(
            f"input: the corpus is empty after cleaning ({len(spec.files)} files read, {len(skipped)} skipped as "
            f"binary or unreadable{': ' + ', '.join(skipped[:3]) if skipped else ''}, "
            f"{totals['empty_documents']} empty documents, {totals['invalid_json_lines']} unusable JSON lines); "
            "point input=[...] at text files with content"
        )
    tokenizer, trained, seconds = _obtain_tokenizer(work, spec, config, threads, kept)
    plan = {
        "documents": kept,
        "cleaning": totals,
        "tokenizer": {"file": tokenizer.file_name, "special_ids": tokenizer.special_ids},
        "tokenizer_trained": trained,
        "tokenizer_seconds": seconds,
    }
    write_json_atomic(work.plan_file, plan)
    return plan


def _totals(scans: list[dict[str, Any]]) -> dict[str, Any]:
    stats, encodings = CleanStats(), Counter[str]()
    binary, unreadable = [], []
    for scan in scans:
        stats.add(CleanStats(**scan["stats"]))
        encodings.update(scan["encodings"])
        binary += scan["binary_files"]
        unreadable += scan["unreadable_files"]
    return {
        "documents_read": sum(scan["documents"] for scan in scans),
        "duplicates_removed": 0,
        **stats.__dict__,
        "encodings": dict(sorted(encodings.items())),
        "binary_files_skipped": binary,
        "unreadable_files_skipped": unreadable,
    }


def _deduplicate(work: WorkDir, slices: int) -> int:
    """Write each slice's keep mask (first occurrences of documents with text); returns how many are kept."""
    present = [np.fromfile(work.scan_present(n), dtype=np.uint8).astype(bool) for n in range(slices)]
    hashes = [np.fromfile(work.scan_hashes(n), dtype="<u8").reshape(-1, 2)[mask] for n, mask in enumerate(present)]
    everything = np.concatenate(hashes) if hashes else np.zeros((0, 2), dtype="<u8")
    # lexsort is stable: among equal hashes, the earliest document comes first and is the one kept.
    order = np.lexsort((everything[:, 1], everything[:, 0]))
    ordered = everything[order]
    first_in_order = np.ones(len(order), dtype=bool)
    first_in_order[1:] = (ordered[1:] != ordered[:-1]).any(axis=1)
    first = np.zeros(len(order), dtype=bool)
    first[order[first_in_order]] = True
    offset = 0
    for number, mask in enumerate(present):
        keep = np.zeros(len(mask), dtype=bool)
        keep[mask] = first[offset : offset + int(mask.sum())]
        offset += int(mask.sum())
        path = work.keep(number)
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_name(f".{path.stem}.tmp.npy")
        np.save(temp, keep)
        temp.replace(path)
    return int(first.sum())


def given_tokenizer(config: PrepConfig) -> TokenizerInfo | None:
    """The tokenizer named by tokenizer.model_path or tokenizer.hf_path, read and checked; None: trained."""
    if config.tokenizer.hf_path is not None:
        return load_hf_tokenizer(config.tokenizer)
    if config.tokenizer.model_path is not None:
        return load_tokenizer(config.tokenizer)
    return None


def _obtain_tokenizer(
    work: WorkDir, spec: RunSpec, config: PrepConfig, threads: int, documents: int
) -> tuple[TokenizerInfo, bool, float]:
    given = given_tokenizer(config)
    if given is not None:
        write_bytes_atomic(work.tokenizer_file(given.file_name), given.data)
        return given, False, 0.0
    if work.tokenizer.is_file():
        print(f"reusing the tokenizer trained by an interrupted run ({work.tokenizer})", flush=True)
        return info_from_proto(work.tokenizer.read_bytes()), True, 0.0
    started = time.perf_counter()
    parts = [
        (work.scan_keys(number), work.scan_lines(number))
        for number in range(len(spec.slices))
        if work.scan_keys(number).is_file()
    ]
    lines = merge_samples(parts, config.tokenizer.sample_lines)
    if not lines:
        raise UserError(
            f"val_fraction={config.val_fraction}: all {documents} documents went to the validation split, "
            "so the training split is empty; lower val_fraction or split_passage_chars, or add text"
        )
    info = train_tokenizer(lines, config.tokenizer, threads)
    write_bytes_atomic(work.tokenizer, info.data)
    seconds = time.perf_counter() - started
    print(
        f"tokenizer: trained {config.tokenizer.model_type} vocab {info.vocab_size} on {len(lines)} sampled lines "
        f"in {seconds:.1f} s",
        flush=True,
    )
    return info, True, round(seconds, 3)


def planned_tokenizer(work: WorkDir) -> TokenizerInfo:
    """The tokenizer the plan chose, as the encode and merge stages read it back from the work directory."""
    plan = work.read_plan()
    if plan is None:
        raise UserError(f"{work.plan_file} is missing: the plan did not finish; run the same command again")
    recorded = plan.get("tokenizer")
    if recorded is None:  # a plan written before Hugging Face tokenizers: SentencePiece's tokenizer.model
        return info_from_proto(work.tokenizer.read_bytes())
    data = work.tokenizer_file(recorded["file"]).read_bytes()
    return hf_info(data, recorded["special_ids"]) if is_hf_tokenizer(data) else info_from_proto(data)
