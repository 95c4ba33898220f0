"""data_prep on the demo corpus, measured side by side in one run on one machine.

    python benchmarks/bench_prep.py [--workers N] [--repeats 3] [--copies 10]

(a) tokenizer training time (sampling pass + SentencePiece), next to the encoding pass of the same run;
(b) with that tokenizer given (tokenizer.model_path), the end-to-end tokens/s of `python -m data_prep` (the
    whole process: start-up, reading, cleaning, tokenizing, packing, hashing, fsync, manifest) next to raw
    `SentencePieceProcessor.encode` over the same cleaned documents on a Pool of as many processes (largest
    document first, pool started and model loaded before the clock starts: the best case for raw encoding),
    and their ratio (target >= 0.85); the two alternate `--repeats` times and the fastest of each is kept, so
    that a burst of load from other processes on the machine does not decide the ratio;
(c) peak memory (VmHWM, sampled from /proc) of the main process and of the largest worker, and the largest sum
    over the process tree, for the demo corpus (~12 MB) and for it replicated `--copies` times (~120 MB, a
    distinct first line per copy so that deduplication keeps every copy).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import sentencepiece as spm
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_prep.config import CorpusConfig  # noqa: E402
from data_prep.corpus import fetch_corpus  # noqa: E402
from data_prep.documents import CleanStats, clean_text, decode_utf8  # noqa: E402

DEMO_YAML = REPO / "conf" / "corpus" / "demo_books.yaml"
MB = 1e6


def demo_settings() -> tuple[Path, list[str]]:
    """The demo corpus' directory and the dataset settings of conf/corpus/demo_books.yaml as overrides."""
    loaded = OmegaConf.load(DEMO_YAML)
    corpus = fetch_corpus(CorpusConfig(**OmegaConf.to_container(loaded.corpus)))  # type: ignore[arg-type]
    settings = [
        f"seq_len={loaded.seq_len}",
        f"val_fraction={loaded.val_fraction}",
        f"shard_size_mb={loaded.shard_size_mb}",
        f"tokenizer.vocab_size={loaded.tokenizer.vocab_size}",
    ]
    return corpus, settings


def replicate(corpus: Path, target: Path, copies: int) -> int:
    """`copies` copies of every book, each with its own first line (so no copy is a duplicate)."""
    target.mkdir(parents=True)
    total = 0
    for copy in range(copies):
        for book in sorted(corpus.glob("*.txt")):
            data = f"[copy {copy} of {book.name}]\n".encode() + book.read_bytes()
            (target / f"{copy:02d}-{book.name}").write_bytes(data)
            total += len(data)
    return total


@dataclass
class Measured:
    """One `python -m data_prep` run: wall time, its output, and peak resident memory per process."""

    seconds: float
    stdout: str
    peak_main: int = 0
    peak_worker: int = 0
    peak_tree: int = 0  # the largest sum of current RSS over the process tree at one sampling instant


def _high_water_mark(pid: int) -> int:
    """Peak RSS of a live process in bytes (VmHWM), 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_data_prep(*args: str) -> Measured:
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "data_prep", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    main = psutil.Process(process.pid)
    measured = Measured(0.0, "")
    output: list[str] = []
    reader = _start_reader(process, output)
    while process.poll() is None:
        measured.peak_main = max(measured.peak_main, _high_water_mark(main.pid))
        tree = 0
        try:
            processes = [main, *main.children(recursive=True)]
        except psutil.NoSuchProcess:
            processes = []
        for member in processes:
            try:
                tree += member.memory_info().rss
                # The encoding workers, not multiprocessing's resource tracker.
                if member is not main and "spawn_main" in " ".join(member.cmdline()):
                    measured.peak_worker = max(measured.peak_worker, _high_water_mark(member.pid))
            except psutil.NoSuchProcess:
                continue
        measured.peak_tree = max(measured.peak_tree, tree)
        time.sleep(0.1)
    measured.seconds = time.perf_counter() - started
    reader.join()
    measured.stdout = "".join(output)
    if process.returncode != 0:
        raise SystemExit(f"data_prep {' '.join(args)} failed:\n{measured.stdout[-3000:]}")
    return measured


def _start_reader(process: subprocess.Popen[str], sink: list[str]) -> threading.Thread:
    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            sink.append(line)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


def cleaned_documents(corpus: Path) -> list[str]:
    """The documents data_prep encodes: decoded, cleaned, exact duplicates removed, in input order."""
    stats, seen, documents = CleanStats(), set(), []
    for path in sorted(corpus.glob("*.txt")):
        text = clean_text(decode_utf8(path.read_bytes())[0], stats)
        if text is not None and text not in seen:
            seen.add(text)
            documents.append(text)
    return documents


_processor: spm.SentencePieceProcessor | None = None


def _load_model(model: str) -> None:
    global _processor
    _processor = spm.SentencePieceProcessor(model_file=model)


def _encode(text: str) -> int:
    assert _processor is not None
    return len(_processor.encode(text))


def raw_encode(model: Path, documents: list[str], workers: int) -> tuple[int, float]:
    """Tokens and seconds of SentencePiece alone on `workers` processes, largest document first."""
    largest_first = sorted(documents, key=len, reverse=True)
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_load_model, initargs=(str(model),)) as pool:
        pool.map(_encode, ["warm-up"] * workers, chunksize=1)  # processes started, model loaded
        started = time.perf_counter()
        tokens = sum(pool.imap_unordered(_encode, largest_first, chunksize=1))
        return tokens, time.perf_counter() - started


def _reported(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    return float(match.group(1).replace(",", "")) if match else float("nan")


def _manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="encoding processes")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs of (b); the fastest counts")
    parser.add_argument("--copies", type=int, default=10, help="copies of the demo corpus for the large input")
    args = parser.parse_args()
    workers = args.workers

    corpus, settings = demo_settings()
    corpus_bytes = sum(p.stat().st_size for p in corpus.glob("*.txt"))
    print(
        f"machine: {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, Python "
        f"{platform.python_version()}, sentencepiece {spm.__version__}; workers={workers}; demo corpus "
        f"{corpus_bytes / MB:.1f} MB; {' '.join(settings)}; load average at start {_load_average()}",
        flush=True,
    )
    scratch = Path(tempfile.mkdtemp(prefix="bench_prep-"))
    try:
        # (a) a full run that trains the tokenizer.
        trained = run_data_prep(
            f"input=[{corpus}]", f"output_dir={scratch / 'trained'}", *settings, f"num_workers={workers}"
        )
        train_s = _reported(r"tokenizer: trained .* in ([\d.]+) s", trained.stdout)
        encode_s = _reported(r"encoding ([\d.]+) s", trained.stdout)
        model = scratch / "trained" / "tokenizer.model"

        # (b) the same corpus with the tokenizer given, next to raw SentencePiece.
        given = [*settings, f"tokenizer.model_path={model}", f"num_workers={workers}"]
        documents = cleaned_documents(corpus)
        runs, raws = [], []
        for attempt in range(args.repeats):
            out = scratch / f"small-{attempt}"
            runs.append(run_data_prep(f"input=[{corpus}]", f"output_dir={out}", *given))
            raws.append(raw_encode(model, documents, workers))
        small = min(runs, key=lambda run: run.seconds)
        small_tokens = _manifest(scratch / "small-0")["tokens"]
        raw_tokens, raw_s = min(raws, key=lambda raw: raw[1])
        prep_rate, raw_rate = small_tokens / small.seconds, raw_tokens / raw_s
        phase_rate = max(_reported(r"at ([\d,]+) tokens/s", run.stdout) for run in runs)

        # (c) ten times the input.
        large_bytes = replicate(corpus, scratch / "large-input", args.copies)
        large = run_data_prep(f"input=[{scratch / 'large-input'}]", f"output_dir={scratch / 'large'}", *given)
        large_tokens = _manifest(scratch / "large")["tokens"]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    def mib(n: int) -> str:
        return f"{n / 2**20:,.0f}"

    print()
    print("(a) tokenizer training")
    print(f"  sampling pass + SentencePiece training  {train_s:8.1f} s")
    print(
        f"  encoding pass of the same run           {encode_s:8.1f} s   (training / encoding = {train_s / encode_s:.2f})"
    )
    print(f"  whole run                               {trained.seconds:8.1f} s")
    print()
    print(f"(b) throughput, {workers} processes, tokenizer given (fastest of {args.repeats}, all runs in seconds)")
    print(f"  {'':42}{'tokens':>11}{'seconds':>9}{'tokens/s':>11}  all")
    print(
        f"  {'python -m data_prep, end to end':42}{small_tokens:>11,}{small.seconds:>9.2f}{prep_rate:>11,.0f}  "
        + " ".join(f"{run.seconds:.2f}" for run in runs)
    )
    print(
        f"  {'raw SentencePieceProcessor.encode, Pool':42}{raw_tokens:>11,}{raw_s:>9.2f}{raw_rate:>11,.0f}  "
        + " ".join(f"{raw[1]:.2f}" for raw in raws)
    )
    verdict = "meets" if prep_rate / raw_rate >= 0.85 else "BELOW"
    print(f"  ratio end to end / raw: {prep_rate / raw_rate:.3f} ({verdict} the 0.85 target)")
    print(f"  ratio of data_prep's own encoding phase ({phase_rate:,.0f} tokens/s) / raw: {phase_rate / raw_rate:.3f}")
    print()
    print("(c) peak resident memory (MiB)")
    print(f"  {'input':34}{'seconds':>9}{'tokens/s':>12}{'main':>8}{'worker':>8}{'tree':>8}")
    rows = [
        (f"{corpus_bytes / MB:.0f} MB, training the tokenizer", trained, _manifest_tokens(trained, small_tokens)),
        (f"{corpus_bytes / MB:.0f} MB, tokenizer given", small, small_tokens),
        (f"{large_bytes / MB:.0f} MB, tokenizer given", large, large_tokens),
    ]
    for label, run, tokens in rows:
        print(
            f"  {label:34}{run.seconds:>9.1f}{tokens / run.seconds:>12,.0f}{mib(run.peak_main):>8}"
            f"{mib(run.peak_worker):>8}{mib(run.peak_tree):>8}"
        )
    print(
        f"  (large / small input: {large_bytes / corpus_bytes:.1f}x the bytes, main process peak "
        f"{large.peak_main / small.peak_main:.2f}x, worker peak {large.peak_worker / small.peak_worker:.2f}x)"
    )
    print(f"load average at the end {_load_average()} (other work on the machine slows both sides of a ratio alike)")


def _load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def _manifest_tokens(run: Measured, fallback: int) -> int:
    match = re.search(r"documents, ([\d,]+) tokens", run.stdout)
    return int(match.group(1).replace(",", "")) if match else fallback


if __name__ == "__main__":
    main()
