"""`python -m data_prep.inspect_dataset DIR`: verify every shard against the manifest and decode a few samples.

Exit code 0 when every shard and the tokenizer match their sha256 and sample counts, 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import sentencepiece as spm
import webdataset as wds

from common.app import EXIT_USER_ERROR, report_user_error
from common.errors import UserError
from common.tokenizer_files import is_hf_tokenizer
from data_prep.manifest import Manifest, load_manifest, verify_shards


def count_samples(path: Path) -> int:
    """Samples in a shard, read with plain webdataset (no code of ours)."""
    return sum(1 for _ in wds.WebDataset(str(path), shardshuffle=False))


def decoder(path: Path) -> Callable[[list[int]], str]:
    """Token ids -> text with the dataset's tokenizer: a SentencePiece model or a Hugging Face tokenizer.json."""
    data = path.read_bytes()
    if is_hf_tokenizer(data):
        from data_prep.hf_tokenizer import parse_tokenizer

        tokenizer = parse_tokenizer(data, str(path))
        # Document boundaries show as the EOS token's text (SentencePiece's decode drops its control pieces).
        return lambda ids: tokenizer.decode(ids, skip_special_tokens=False)
    processor = spm.SentencePieceProcessor(model_proto=data)
    return lambda ids: processor.decode(ids)


def decode_samples(root: Path, manifest: Manifest, split: str, count: int, chars: int) -> list[str]:
    decode = decoder(root / manifest.tokenizer_file)
    texts = []
    paths = [str(p) for p in manifest.shard_paths(root, split)]
    for sample in wds.WebDataset(paths, shardshuffle=False).decode():
        tokens = np.asarray(sample["tokens.npy"]).tolist()
        texts.append(f"[{sample['__key__']}] " + decode(tokens)[:chars])
        if len(texts) == count:
            break
    return texts


def inspect(root: Path, samples: int, chars: int, check_hash: bool = True) -> int:
    manifest = load_manifest(root)
    problems = verify_shards(root, manifest, check_hash=check_hash)
    for split, info in manifest.splits.items():
        for shard in info.shards:
            path = root / shard.name
            if path.is_file() and (found := count_samples(path)) != shard.samples:
                problems.append(f"{split} shard {shard.name} holds {found} samples, manifest says {shard.samples}")
    shards = sum(len(s.shards) for s in manifest.splits.values())
    print(
        f"{root}: format {manifest.format_version}, seq_len {manifest.seq_len}, {manifest.dtype}, vocab "
        f"{manifest.vocab_size}, {manifest.documents} documents, {manifest.tokens:,} tokens, {shards} shards"
    )
    for split, info in manifest.splits.items():
        print(f"  {split}: {info.samples} samples, {info.tokens:,} tokens, {len(info.shards)} shards")
    if problems:
        for problem in problems:
            print(f"  PROBLEM: {problem}")
        print(f"{root}: {len(problems)} problem(s) found; prepare the dataset again with data_prep")
        return 1
    print(f"  all {shards} shards match the manifest (sha256 and sample counts)")
    for split, info in manifest.splits.items():
        if info.samples:
            for text in decode_samples(root, manifest, split, samples, chars):
                print(f"  {split} {text!r}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_prep.inspect_dataset", description=__doc__)
    parser.add_argument("dir", type=Path, help="a dataset directory written by python -m data_prep")
    parser.add_argument("--samples", type=int, default=2, help="samples to decode per split")
    parser.add_argument("--chars", type=int, default=200, help="characters of each decoded sample to show")
    parser.add_argument("--quick", action="store_true", help="check sizes and counts, skip the sha256")
    args = parser.parse_args(argv)
    try:
        return inspect(args.dir, args.samples, args.chars, check_hash=not args.quick)
    except UserError as error:
        report_user_error(error)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
