"""The peer `python -m data_prep ... tokenizer.hf_path=DIR` is measured against (benchmarks/bench_prep.py
--tokenizer hf runs it as a subprocess): the `tokenizers` library encoding the cleaned text of a corpus line by
line, in the two ways it offers to use N cores.

    python benchmarks/hf_lines.py pool|rayon --tokenizer DIR --corpus DIR --workers N

`pool`: a multiprocessing Pool of N processes, one Rayon thread each (TOKENIZERS_PARALLELISM=false), each
encoding a document's lines in one `encode_batch_fast` call (pool started and tokenizer loaded before the
clock; each worker reads and cleans its document, as data_prep's workers do). `rayon`: one process whose
`encode_batch_fast` spreads each document's lines over N Rayon threads (RAYON_NUM_THREADS=N), the documents
read and cleaned before the clock (its best case). `encode_batch_fast` is the batch call without character
offsets: the fastest `tokenizers` has. The lines keep their "\\n", so every character is encoded once; special
tokens' strings are encoded as text (as data_prep does). Prints one JSON line: tokens, wall seconds, and CPU
seconds of the encode calls.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_prep.charsets import decode_file  # noqa: E402
from data_prep.documents import CleanStats, clean_text  # noqa: E402

_tokenizer: Any = None


def _load(directory: str) -> None:
    from tokenizers import Tokenizer

    global _tokenizer
    _tokenizer = Tokenizer.from_file(str(Path(directory) / "tokenizer.json"))
    _tokenizer.encode_special_tokens = True


def cleaned_lines(path: str) -> list[str]:
    text = clean_text(decode_file(Path(path).read_bytes()).text, CleanStats()) or ""
    lines = text.split("\n")
    return [line + "\n" for line in lines[:-1]] + lines[-1:]


def _encode(lines: list[str]) -> tuple[int, float]:
    started = time.process_time()
    encoded = _tokenizer.encode_batch_fast(lines, add_special_tokens=False)
    return sum(len(e.ids) for e in encoded), time.process_time() - started


def _encode_file(path: str) -> tuple[int, float]:
    return _encode(cleaned_lines(path))


def run_pool(tokenizer: str, paths: list[str], workers: int) -> dict[str, float]:
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_load, initargs=(tokenizer,)) as pool:
        pool.map(_load, [tokenizer] * workers, chunksize=1)  # processes started, tokenizer loaded
        started = time.perf_counter()
        results = list(pool.imap_unordered(_encode_file, paths, chunksize=1))
        seconds = time.perf_counter() - started
    return {"tokens": sum(r[0] for r in results), "seconds": seconds, "cpu_seconds": sum(r[1] for r in results)}


def run_rayon(tokenizer: str, paths: list[str]) -> dict[str, float]:
    _load(tokenizer)
    documents = [cleaned_lines(path) for path in paths]
    _encode(documents[0][:100])  # the thread pool started
    started = time.perf_counter()
    results = [_encode(lines) for lines in documents]
    seconds = time.perf_counter() - started
    return {"tokens": sum(r[0] for r in results), "seconds": seconds, "cpu_seconds": sum(r[1] for r in results)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("pool", "rayon"))
    parser.add_argument("--tokenizer", required=True, help="a directory holding tokenizer.json")
    parser.add_argument("--corpus", required=True, help="a directory of .txt files")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    # Largest first, so that no worker is left with a large document at the end.
    paths = sorted((str(p) for p in Path(args.corpus).iterdir()), key=lambda p: -os.path.getsize(p))
    if args.mode == "pool":
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # inherited by the spawned workers
        result = run_pool(args.tokenizer, paths, args.workers)
    else:
        # Read by the Rayon pool when it starts, at the first parallel call.
        os.environ["RAYON_NUM_THREADS"] = str(args.workers)
        os.environ["TOKENIZERS_PARALLELISM"] = "true"
        result = run_rayon(args.tokenizer, paths)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
