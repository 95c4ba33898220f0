"""data_prep on the demo corpus, measured side by side in one run on one machine.

    python benchmarks/bench_prep.py [--workers N] [--repeats 5] [--copies 10]

(a) tokenizer training time (sampling pass + SentencePiece), next to the encoding pass of the same run;
(b) with that tokenizer given (tokenizer.model_path), the end-to-end throughput of `python -m data_prep` (the
    whole process: start-up, reading, cleaning, tokenizing, packing, hashing, fsync, manifest) next to raw
    `SentencePieceProcessor.encode` of the same cleaned text on a Pool of as many processes (longest text
    first, pool started and model loaded before the clock starts: the best case for raw encoding), and their
    ratio (target >= 0.85). The raw text is cut three ways, since SentencePiece slows down on very long
    inputs: whole documents, the split runs data_prep hands to encode(), and passages. Both wall time and CPU
    time are shown: on a machine shared with other work, wall time measures the neighbours as much as the
    code, while CPU seconds (all processes: data_prep's main process and workers; the raw encode calls) do
    not. data_prep and the raw runs alternate `--repeats` times and the fastest of each counts;
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
import resource
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
from data_prep.documents import CleanStats, clean_text, decode_utf8, passages, split_runs  # noqa: E402

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
class Timing:
    tokens: int
    seconds: float  # wall clock
    cpu_seconds: float  # user + system, over every process that did the work

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds

    @property
    def cpu_rate(self) -> float:
        return self.tokens / self.cpu_seconds


@dataclass
class Measured:
    """One `python -m data_prep` run: times, its output, and peak resident memory per process."""

    seconds: float = 0.0
    cpu_seconds: float = 0.0
    stdout: str = ""
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


def _children_cpu() -> float:
    # Includes every descendant a finished child waited for: data_prep's workers are in its figure.
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_data_prep(*args: str) -> Measured:
    cpu_before, started = _children_cpu(), time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "data_prep", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    main = psutil.Process(process.pid)
    measured = Measured()
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(process.stdout or []), daemon=True)
    reader.start()
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
    measured.cpu_seconds = _children_cpu() - cpu_before
    reader.join()
    measured.stdout = "".join(output)
    if process.returncode != 0:
        raise SystemExit(f"data_prep {' '.join(args)} failed:\n{measured.stdout[-3000:]}")
    return measured


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


def _encode(text: str) -> tuple[int, float]:
    assert _processor is not None
    started = time.process_time()
    tokens = len(_processor.encode(text))
    return tokens, time.process_time() - started


def raw_encode(model: Path, texts: list[str], workers: int) -> Timing:
    """SentencePiece alone on `workers` processes, longest text first; CPU time of the encode calls only."""
    longest_first = sorted(texts, key=len, reverse=True)
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_load_model, initargs=(str(model),)) as pool:
        pool.map(_encode, ["warm-up"] * workers, chunksize=1)  # processes started, model loaded
        started = time.perf_counter()
        results = list(pool.imap_unordered(_encode, longest_first, chunksize=1))
        seconds = time.perf_counter() - started
    return Timing(sum(r[0] for r in results), seconds, sum(r[1] for r in results))


def _reported(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    return float(match.group(1).replace(",", "")) if match else float("nan")


def _manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def _load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="encoding processes")
    parser.add_argument("--repeats", type=int, default=5, help="alternating runs of (b); the fastest counts")
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
        model = scratch / "trained" / "tokenizer.model"
        config = _manifest(scratch / "trained")["config"]

        # (b) the same corpus with the tokenizer given, next to raw SentencePiece on the same text, cut three
        # ways: whole documents; the split runs data_prep hands to encode(); passages of split_passage_chars.
        given = [*settings, f"tokenizer.model_path={model}", f"num_workers={workers}"]
        documents = cleaned_documents(corpus)
        baselines = {
            "raw encode, whole documents": documents,
            "raw encode, the same split runs": [
                run
                for document in documents
                for _, run in split_runs(document, config["split_passage_chars"], config["val_fraction"])
            ],
            "raw encode, passages": [
                piece for document in documents for piece in passages(document, config["split_passage_chars"])
            ],
        }
        prep_runs: list[Measured] = []
        raw_runs: dict[str, list[Timing]] = {name: [] for name in baselines}
        for attempt in range(args.repeats):
            prep_runs.append(run_data_prep(f"input=[{corpus}]", f"output_dir={scratch / f'small-{attempt}'}", *given))
            for name, texts in baselines.items():
                raw_runs[name].append(raw_encode(model, texts, workers))
        small_tokens = _manifest(scratch / "small-0")["tokens"]

        # (c) the corpus `--copies` times.
        large_bytes = replicate(corpus, scratch / "large-input", args.copies)
        large = run_data_prep(f"input=[{scratch / 'large-input'}]", f"output_dir={scratch / 'large'}", *given)
        large_tokens = _manifest(scratch / "large")["tokens"]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    train_s = _reported(r"tokenizer: trained .* in ([\d.]+) s", trained.stdout)
    encode_s = _reported(r"encoding ([\d.]+) s", trained.stdout)
    print()
    print("(a) tokenizer training")
    print(f"  sampling pass + SentencePiece training  {train_s:8.1f} s")
    print(
        f"  encoding pass of the same run           {encode_s:8.1f} s   (training / encoding {train_s / encode_s:.2f})"
    )
    print(f"  whole run                               {trained.seconds:8.1f} s")

    print()
    print(f"(b) throughput on {workers} processes, tokenizer given; the fastest of {args.repeats} alternating runs")
    prep = [Timing(small_tokens, run.seconds, run.cpu_seconds) for run in prep_runs]
    rows = {"python -m data_prep, end to end": prep, **raw_runs}
    best = {name: min(timings, key=lambda t: t.seconds) for name, timings in rows.items()}
    best_cpu = {name: min(timings, key=lambda t: t.cpu_seconds) for name, timings in rows.items()}
    ours, ours_cpu = best["python -m data_prep, end to end"], best_cpu["python -m data_prep, end to end"]
    print(
        f"  {'':34}{'tokens':>10}{'wall s':>8}{'tokens/s':>11}{'ratio':>7}{'CPU s':>8}{'tokens/CPU s':>13}"
        f"{'ratio':>7}  wall s of every run"
    )
    for name, timings in rows.items():
        wall, cpu = best[name], best_cpu[name]
        print(
            f"  {name:34}{wall.tokens:>10,}{wall.seconds:>8.2f}{wall.rate:>11,.0f}{ours.rate / wall.rate:>7.3f}"
            f"{cpu.cpu_seconds:>8.2f}{cpu.cpu_rate:>13,.0f}{ours_cpu.cpu_rate / cpu.cpu_rate:>7.3f}  "
            + " ".join(f"{t.seconds:.1f}" for t in timings)
        )
    whole, whole_cpu = best["raw encode, whole documents"], best_cpu["raw encode, whole documents"]
    print(
        f"  ratio = data_prep / raw. Against whole documents (the target's baseline, >= 0.85): wall "
        f"{ours.rate / whole.rate:.3f}, CPU {ours_cpu.cpu_rate / whole_cpu.cpu_rate:.3f}."
    )
    phase_rate = max(_reported(r"at ([\d,]+) tokens/s", run.stdout) for run in prep_runs)
    print(f"  data_prep's own encoding phase (no start-up, no tokenizer loading) reports {phase_rate:,.0f} tokens/s.")

    print()
    print("(c) peak resident memory in MiB (VmHWM; tree: largest sum of RSS over the processes at one time)")
    print(f"  {'input':34}{'wall s':>8}{'CPU s':>8}{'main':>8}{'worker':>8}{'tree':>8}")
    small = min(prep_runs, key=lambda run: run.seconds)
    for label, run in [
        (f"{corpus_bytes / MB:.0f} MB, training the tokenizer", trained),
        (f"{corpus_bytes / MB:.0f} MB, tokenizer given", small),
        (f"{large_bytes / MB:.0f} MB, tokenizer given", large),
    ]:
        print(
            f"  {label:34}{run.seconds:>8.1f}{run.cpu_seconds:>8.1f}{_mib(run.peak_main):>8}"
            f"{_mib(run.peak_worker):>8}{_mib(run.peak_tree):>8}"
        )
    print(
        f"  ({large_bytes / corpus_bytes:.1f}x the input, {large_tokens / small_tokens:.1f}x the tokens: main process "
        f"peak {large.peak_main / small.peak_main:.2f}x, worker peak {large.peak_worker / small.peak_worker:.2f}x; "
        f"{large_tokens / large.cpu_seconds:,.0f} tokens/CPU s)"
    )
    print(f"load average at the end {_load_average()}: other work on the machine slows the runs it overlaps")


if __name__ == "__main__":
    main()
