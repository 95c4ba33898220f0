"""data_prep measured side by side with SentencePiece encoding the same text line by line, in one run.

    python benchmarks/bench_prep.py [--workers N] [--mb 200] [--repeats 3] [--scale-gb 2] [--tmp /tmp]

(a) tokenizer training on the demo corpus: the scan (which samples the lines) and SentencePiece's training,
    next to the encoding of the same run;
(b) throughput, tokenizer given (tokenizer.model_path), on two corpora generated under --tmp from the demo
    books, about --mb MB each: hard-wrapped novels as they are (copies, each with its own first line so that
    none is a duplicate), and the same text with every paragraph unwrapped and paragraphs joined into lines of
    100 kB and more. `python -m data_prep` end to end (the whole process tree: start-up, scan, plan, reading,
    cleaning, tokenizing, packing, hashing, fsync, merge) against SentencePiece itself encoding the cleaned
    text line by line on a Pool of as many processes (one batch call per document, its ids as Python lists
    or NumPy arrays, whichever is faster; pool started and model loaded before the clock: SentencePiece's
    best case). Both as wall time and as CPU time (all of data_prep's processes; the encode calls alone for
    SentencePiece): on a machine shared with other work, wall time measures the neighbours as much as the
    code. Alternating runs, the fastest of each counts. Target: ratio >= 0.9;
(c) scale, --scale-gb GB of the demo books with their lines shuffled (many copies): peak resident memory
    (VmHWM, sampled from /proc) of the main process and of the largest worker next to the same for the
    --mb corpus of (b), throughput against SentencePiece as in (b), the seconds of each stage, and the
    extrapolation to 1 TB: how many array tasks, and how long.

With --tokenizer hf: the same (b) with a Hugging Face tokenizer (tokenizer.hf_path), a GPT-2 style byte-level
BPE of the demo's vocabulary size trained here with `tokenizers` on the demo corpus, against `tokenizers`
itself encoding the cleaned text line by line (benchmarks/hf_lines.py): on a Pool of as many processes of
one thread each, and in one process with as many Rayon threads; the faster of the two is the baseline.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import random
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import sentencepiece as spm
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_prep.charsets import decode_file  # noqa: E402
from data_prep.config import CorpusConfig  # noqa: E402
from data_prep.corpus import fetch_corpus  # noqa: E402
from data_prep.documents import CleanStats, clean_text  # noqa: E402

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


def _books(corpus: Path) -> list[tuple[str, str]]:
    return [(p.name, decode_file(p.read_bytes()).text) for p in sorted(corpus.glob("*.txt"))]


def _write_copies(target: Path, megabytes: float, variant) -> int:  # type: ignore[no-untyped-def]
    """Copies of the demo books made by `variant(text, copy)` until `megabytes`; returns the bytes written."""
    target.mkdir(parents=True)
    total, copy = 0, 0
    while total < megabytes * MB:
        for name, text in BOOKS:
            data = variant(text, copy).encode("utf-8")
            (target / f"{copy:05d}-{name}").write_bytes(data)
            total += len(data)
        copy += 1
    return total


def hard_wrapped(text: str, copy: int) -> str:
    return f"[copy {copy}]\n{text}"


def long_lines(text: str, copy: int) -> str:
    """Paragraphs unwrapped (their line breaks become spaces), then joined into lines of 100 kB and more."""
    paragraphs = [" ".join(p.split()) for p in text.replace("\r\n", "\n").split("\n\n") if p.strip()]
    lines, current, size = [], [], 0
    for paragraph in paragraphs:
        current.append(paragraph)
        size += len(paragraph) + 2
        if size >= 100_000:
            lines.append("  ".join(current))
            current, size = [], 0
    if current:
        lines.append("  ".join(current))
    return f"[copy {copy}] " + "\n".join(lines) + "\n"


def shuffled_lines(text: str, copy: int) -> str:
    lines = text.split("\n")
    random.Random(copy).shuffle(lines)
    return f"[copy {copy}]\n" + "\n".join(lines)


@dataclass
class Measured:
    """One `python -m data_prep` run: times, its output, and peak resident memory per process."""

    seconds: float = 0.0
    cpu_seconds: float = 0.0
    stdout: str = ""
    peak_main: int = 0
    peak_worker: int = 0
    peak_tree: int = 0  # the largest sum of current RSS over the process tree at one sampling instant
    stages: dict[str, float] = field(default_factory=dict)


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
    measured.stages = {k: float(v) for k, v in re.findall(r"(scan|plan|encode|merge) ([\d.]+) s", measured.stdout)}
    return measured


# ---- SentencePiece alone, line by line ------------------------------------------------------------------

_processor: spm.SentencePieceProcessor | None = None


def _load_model(model: str) -> None:
    global _processor
    _processor = spm.SentencePieceProcessor(model_file=model)


def _encode_lines(job: tuple[str, bool]) -> tuple[int, float]:
    """(tokens, CPU seconds of the encode call) of one document, encoded line by line in one batch call; the
    newline between lines counts as the one token it is in the document."""
    assert _processor is not None
    path, arrays = job
    text = clean_text(decode_file(Path(path).read_bytes()).text, CleanStats()) or ""
    lines = text.split("\n")
    started = time.process_time()
    if arrays:
        tokens = sum(len(ids) for ids in _processor.encode(lines, num_threads=1, return_type="numpy"))
    else:
        tokens = sum(len(ids) for ids in _processor.encode(lines, num_threads=1))
    return tokens + len(lines) - 1, time.process_time() - started


@dataclass
class Timing:
    tokens: int
    seconds: float  # wall clock
    cpu_seconds: float

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds

    @property
    def cpu_rate(self) -> float:
        return self.tokens / self.cpu_seconds


def sentencepiece_lines(model: Path, corpus: Path, workers: int, arrays: bool) -> Timing:
    paths = sorted((str(p) for p in corpus.iterdir()), key=lambda p: -os.path.getsize(p))
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_load_model, initargs=(str(model),)) as pool:
        pool.map(_load_model, [str(model)] * workers, chunksize=1)  # processes started, model loaded
        started = time.perf_counter()
        results = list(pool.imap_unordered(_encode_lines, [(p, arrays) for p in paths], chunksize=1))
        seconds = time.perf_counter() - started
    return Timing(sum(r[0] for r in results), seconds, sum(r[1] for r in results))


def _manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f}"


def _load() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def compare(name: str, corpus: Path, model: Path, settings: list[str], scratch: Path, workers: int, repeats: int):  # type: ignore[no-untyped-def]
    """Alternating runs of data_prep and of SentencePiece line by line; prints the fastest of each."""
    ours: list[tuple[Timing, Measured]] = []
    raw: dict[str, list[Timing]] = {"ids as lists": [], "ids as NumPy arrays": []}
    for attempt in range(repeats):
        out = scratch / f"{name}-{attempt}"
        run = run_data_prep(f"input=[{corpus}]", f"output_dir={out}", *settings, f"tokenizer.model_path={model}")
        ours.append((Timing(_manifest(out)["tokens"], run.seconds, run.cpu_seconds), run))
        shutil.rmtree(out)
        for kind in raw:
            raw[kind].append(sentencepiece_lines(model, corpus, workers, arrays=kind.endswith("arrays")))
    best_wall = min((t for t, _ in ours), key=lambda t: t.seconds)
    best_cpu = min((t for t, _ in ours), key=lambda t: t.cpu_seconds)
    base_wall = max((t for ts in raw.values() for t in ts), key=lambda t: t.rate)
    base_cpu = max((t for ts in raw.values() for t in ts), key=lambda t: t.cpu_rate)
    print(f"  {name}: {sum(p.stat().st_size for p in corpus.iterdir()) / MB:,.0f} MB")
    print(f"    {'':44}{'tokens':>13}{'wall s':>8}{'tokens/s':>12}{'CPU s':>8}{'tokens/CPU s':>14}  wall s of each run")
    rows = [("python -m data_prep, end to end", [t for t, _ in ours])] + [
        (f"SentencePiece line by line, {kind}", timings) for kind, timings in raw.items()
    ]
    for label, timings in rows:
        wall, cpu = min(timings, key=lambda t: t.seconds), min(timings, key=lambda t: t.cpu_seconds)
        print(
            f"    {label:44}{wall.tokens:>13,}{wall.seconds:>8.1f}{wall.rate:>12,.0f}{cpu.cpu_seconds:>8.1f}"
            f"{cpu.cpu_rate:>14,.0f}  " + " ".join(f"{t.seconds:.1f}" for t in timings)
        )
    print(
        f"    ratio data_prep / SentencePiece line by line (target >= 0.9): wall {best_wall.rate / base_wall.rate:.3f}, "
        f"CPU {best_cpu.cpu_rate / base_cpu.cpu_rate:.3f}"
    )
    fastest_kind = max(raw, key=lambda kind: max(t.cpu_rate for t in raw[kind]))
    return min(ours, key=lambda pair: pair[0].seconds)[1], fastest_kind.endswith("arrays")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="encoding processes")
    parser.add_argument("--mb", type=float, default=200, help="size of each corpus of (b)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs of (b); the fastest counts")
    parser.add_argument("--scale-gb", type=float, default=2.0, help="size of the corpus of (c); 0 skips (c)")
    parser.add_argument("--tmp", default=tempfile.gettempdir(), help="where the corpora are generated")
    parser.add_argument(
        "--tokenizer", choices=("sentencepiece", "hf"), default="sentencepiece", help="hf: (b) with tokenizer.hf_path"
    )
    args = parser.parse_args()
    workers = args.workers

    corpus, settings = demo_settings()
    global BOOKS
    BOOKS = _books(corpus)
    print(
        f"machine: {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, Python "
        f"{platform.python_version()}, sentencepiece {spm.__version__}; workers={workers}; {' '.join(settings)}; "
        f"load average at start {_load()}",
        flush=True,
    )
    scratch = Path(tempfile.mkdtemp(prefix="bench_prep-", dir=args.tmp))
    given = [*settings, f"num_workers={workers}"]
    if args.tokenizer == "hf":
        try:
            hf_throughput(corpus, scratch, given, workers, args.mb, args.repeats)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return
    try:
        # (a) a full run that trains the tokenizer.
        trained = run_data_prep(f"input=[{corpus}]", f"output_dir={scratch / 'trained'}", *given)
        model = scratch / "tokenizer.model"
        shutil.copy(scratch / "trained" / "tokenizer.model", model)
        train_s = float(re.search(r"tokenizer: trained .* in ([\d.]+) s", trained.stdout).group(1))  # type: ignore[union-attr]
        print("\n(a) tokenizer training on the demo corpus")
        print(f"  scan (reads the corpus, samples lines)      {trained.stages.get('scan', 0):8.1f} s")
        print(f"  SentencePiece training (in the plan)        {train_s:8.1f} s")
        print(f"  encoding                                    {trained.stages.get('encode', 0):8.1f} s")
        print(f"  whole run                                   {trained.seconds:8.1f} s")

        # (b) the two corpora.
        print(f"\n(b) throughput on {workers} processes, tokenizer given; fastest of {args.repeats} alternating runs")
        wrapped = scratch / "hard-wrapped"
        _write_copies(wrapped, args.mb, hard_wrapped)
        small_run, arrays = compare("hard-wrapped books", wrapped, model, given, scratch, workers, args.repeats)
        long = scratch / "long-lines"
        _write_copies(long, args.mb, long_lines)
        compare("lines of 100 kB and more", long, model, given, scratch, workers, args.repeats)
        shutil.rmtree(long)

        if args.scale_gb:
            scale(scratch, model, given, workers, args.scale_gb, small_run, wrapped, arrays)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"\nload average at the end {_load()}: other work on the machine slows the runs it overlaps")


def scale(
    scratch: Path,
    model: Path,
    given: list[str],
    workers: int,
    gigabytes: float,
    small: Measured,
    small_corpus: Path,
    arrays: bool,
) -> None:
    """(c); SentencePiece's ids as lists or as arrays, whichever was faster in (b): one baseline run, not two."""
    print(f"\n(c) scale: {gigabytes:g} GB of the demo books with their lines shuffled, tokenizer given")
    corpus = scratch / "scale"
    size = _write_copies(corpus, gigabytes * 1000, shuffled_lines)
    out = scratch / "scale-out"
    run = run_data_prep(f"input=[{corpus}]", f"output_dir={out}", *given, f"tokenizer.model_path={model}")
    tokens = _manifest(out)["tokens"]
    shutil.rmtree(out)
    base = sentencepiece_lines(model, corpus, workers, arrays)
    ours = Timing(tokens, run.seconds, run.cpu_seconds)
    small_bytes = sum(p.stat().st_size for p in small_corpus.iterdir())
    print(f"  {'input':30}{'wall s':>8}{'CPU s':>8}{'main MiB':>10}{'worker MiB':>12}{'tree MiB':>10}")
    for label, measured in ((f"{small_bytes / MB:,.0f} MB", small), (f"{size / MB:,.0f} MB", run)):
        print(
            f"  {label:30}{measured.seconds:>8.1f}{measured.cpu_seconds:>8.1f}{_mib(measured.peak_main):>10}"
            f"{_mib(measured.peak_worker):>12}{_mib(measured.peak_tree):>10}"
        )
    print("  stages: " + ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in run.stages.items()))
    print(
        f"  {tokens:,} tokens: data_prep {ours.rate:,.0f} tokens/s ({ours.cpu_rate:,.0f} per CPU s), SentencePiece "
        f"line by line {base.rate:,.0f} tokens/s ({base.cpu_rate:,.0f} per CPU s): ratio wall "
        f"{ours.rate / base.rate:.3f}, CPU {ours.cpu_rate / base.cpu_rate:.3f}"
    )
    # 1 TB: the CPU seconds per byte measured here, spread over array tasks; the plan and merge grow with the
    # number of documents and shards only.
    cpu_per_tb = run.cpu_seconds / size * 1e12
    tokens_per_tb = tokens / size * 1e12
    print(f"  1 TB of such text: about {tokens_per_tb / 1e9:,.0f} G tokens and {cpu_per_tb / 3600:,.0f} CPU hours:")
    for tasks, cpus in ((64, 16), (256, 16), (512, 32)):
        minutes = cpu_per_tb / (tasks * cpus) / 60
        print(
            f"    {tasks} array tasks of {cpus} CPUs: {minutes:,.0f} min of encoding at this machine's rate per CPU "
            f"(slice_mb 1024: {1e12 / 1.024e9 / tasks:,.0f} slices per task)"
        )


# ---- --tokenizer hf ---------------------------------------------------------------------------------------

HF_LINES = Path(__file__).resolve().parent / "hf_lines.py"


def train_byte_level_bpe(corpus: Path, vocab_size: int, target: Path) -> float:
    """GPT-2's kind of tokenizer (byte-level BPE, <|endoftext|>) trained on the demo books, saved in `target`
    with the tokenizer_config.json naming its EOS; returns the training seconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    started = time.perf_counter()
    tokenizer.train_from_iterator([text for _, text in BOOKS], trainer)
    seconds = time.perf_counter() - started
    target.mkdir(parents=True)
    tokenizer.save(str(target / "tokenizer.json"))
    (target / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return seconds


def tokenizers_lines(mode: str, tokenizer: Path, corpus: Path, workers: int) -> Timing:
    command = [sys.executable, str(HF_LINES), mode, f"--tokenizer={tokenizer}", f"--corpus={corpus}"]
    done = subprocess.run([*command, f"--workers={workers}"], capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return Timing(result["tokens"], result["seconds"], result["cpu_seconds"])


def hf_compare(
    name: str, corpus: Path, tokenizer: Path, settings: list[str], scratch: Path, workers: int, repeats: int
):  # type: ignore[no-untyped-def]
    """Alternating runs of data_prep with tokenizer.hf_path and of `tokenizers` line by line, both ways."""
    labels = {
        "pool": f"tokenizers line by line, Pool of {workers} x 1 thread",
        "rayon": f"tokenizers line by line, 1 process x {workers} threads",
    }
    ours: list[Timing] = []
    raw: dict[str, list[Timing]] = {mode: [] for mode in labels}
    for attempt in range(repeats):
        out = scratch / f"hf-{name}-{attempt}"
        run = run_data_prep(f"input=[{corpus}]", f"output_dir={out}", *settings, f"tokenizer.hf_path={tokenizer}")
        ours.append(Timing(_manifest(out)["tokens"], run.seconds, run.cpu_seconds))
        shutil.rmtree(out)
        for mode in labels:
            raw[mode].append(tokenizers_lines(mode, tokenizer, corpus, workers))
    print(f"  {name}: {sum(p.stat().st_size for p in corpus.iterdir()) / MB:,.0f} MB")
    print(f"    {'':50}{'tokens':>13}{'wall s':>8}{'tokens/s':>12}{'CPU s':>8}{'tokens/CPU s':>14}  wall s of each run")
    rows = [("python -m data_prep tokenizer.hf_path, end to end", ours)]
    rows += [(labels[mode], timings) for mode, timings in raw.items()]
    for label, timings in rows:
        wall, cpu = min(timings, key=lambda t: t.seconds), min(timings, key=lambda t: t.cpu_seconds)
        print(
            f"    {label:50}{wall.tokens:>13,}{wall.seconds:>8.1f}{wall.rate:>12,.0f}{cpu.cpu_seconds:>8.1f}"
            f"{cpu.cpu_rate:>14,.0f}  " + " ".join(f"{t.seconds:.1f}" for t in timings)
        )
    base_wall = max((t for ts in raw.values() for t in ts), key=lambda t: t.rate)
    base_cpu = max((t for ts in raw.values() for t in ts), key=lambda t: t.cpu_rate)
    print(
        f"    ratio data_prep / the faster tokenizers line by line (target >= 0.9): wall "
        f"{max(t.rate for t in ours) / base_wall.rate:.3f}, CPU {max(t.cpu_rate for t in ours) / base_cpu.cpu_rate:.3f}"
    )


def hf_throughput(corpus: Path, scratch: Path, given: list[str], workers: int, mb: float, repeats: int) -> None:
    import tokenizers

    vocab = next(int(s.split("=")[1]) for s in given if s.startswith("tokenizer.vocab_size="))
    settings = [s for s in given if not s.startswith("tokenizer.")]
    tokenizer = scratch / "byte-level-bpe"
    seconds = train_byte_level_bpe(corpus, vocab, tokenizer)
    print(
        f"\ntokenizers {tokenizers.__version__}: byte-level BPE of {vocab} tokens trained on the demo corpus in {seconds:.1f} s"
    )
    print(f"\n(b) throughput on {workers} processes, tokenizer.hf_path; fastest of {repeats} alternating runs")
    wrapped = scratch / "hard-wrapped"
    _write_copies(wrapped, mb, hard_wrapped)
    hf_compare("hard-wrapped books", wrapped, tokenizer, settings, scratch, workers, repeats)
    long = scratch / "long-lines"
    _write_copies(long, mb, long_lines)
    hf_compare("lines of 100 kB and more", long, tokenizer, settings, scratch, workers, repeats)


BOOKS: list[tuple[str, str]] = []

if __name__ == "__main__":
    main()
