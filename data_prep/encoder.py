"""Turning text into token ids: the one interface the encoding workers use, for SentencePiece and Hugging Face.

`TokenEncoder` is all the encoding workers see of a tokenizer (the ids of a run of text); `load_encoder`
tells the kind of tokenizer file from its bytes. (The EOS id comes with TokenizerInfo: for a Hugging Face
tokenizer it is named by files beside tokenizer.json, data_prep/hf_tokenizer.py.)

Why SentencePiece text is cut before encoding, and why the ids stay identical. SentencePiece's BPE gets slower
per character as its input grows (measured: a whole 880 KB novel in one call takes 5x as long as its lines),
so a document is encoded in chunks: its lines, or pieces of about CHUNK_CHARS characters. A cut between
characters i-1 and i leaves the ids unchanged when no piece of the vocabulary contains the two characters
text[i-1:i+1]: BPE merges only adjacent symbols into vocabulary pieces, so no merge can then cross the cut,
and the merges on either side happen in the same relative order (by score, then position) whether or not the
other side is there. Our tokenizers are trained on lines, so no piece contains a newline and every line
break is such a cut; a line of 100 kB or more is cut inside too, at a space (or any other safe pair of
characters). Where every line break is safe, the text is cut at each one: BPE's cost per character still
grows with its input between a line and 256 characters (measured on the demo books: 2.76 CPU-s for one call
on their lines with their line breaks, 3.25 s for pieces of 256 characters, 2.82 s for SentencePiece given the
lines without their line breaks). A line break cut on both sides is one token of its own (its piece, or its
byte piece), so the lines go without their line breaks and that id is joined back between their ids.

This holds only for what the BPE model sees as given: the normalizer must not rewrite text across the cut
(identity rules, no whitespace folding, no dummy prefix added at the start of each input) and unknown
characters must become byte pieces (without byte fallback, a run of unknown characters becomes one <unk>).
A model that does not meet these (a unigram model, whose Viterbi search breaks near-ties in float sums
differently when a prefix is added; a reused model with NFKC rules) is encoded one whole run at a time: slower,
never different. tests/data_prep/test_encoder.py checks the identity on every test corpus.

A Hugging Face tokenizer encodes each run whole, in one call, with no cutting at all: `tokenizers` is linear
in the text (its pre-tokenizer splits words with a regex, its BPE caches words), and measured on the demo
books a whole book (1.2 and 4.3 MB) takes the same CPU time as its lines given to `encode_batch_fast` (0.96
vs 1.07 s, 2.46 vs 2.40 s, best of 5). Cutting would not be exact in general either: GPT-2's pre-tokenizer
regex makes " \n " one piece of "a \n  b", but " \n" and " " when the text is cut after the line break.
"""

from __future__ import annotations

import array
import os
import re
from typing import Any, Protocol

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from common.tokenizer_files import is_hf_tokenizer
from pretrain.core.library_internals import sentencepiece_flat_ids

# Characters per chunk handed to SentencePiece (cut at the first safe place after this many).
CHUNK_CHARS = 256
# How far past CHUNK_CHARS a line break is looked for before a long line is cut inside.
_LINE_LOOKAHEAD = 4
# The longest line SafeCuts.chunks keeps whole at the default chunk size: a document with a longer line is
# handed to chunks (its lines with their line breaks, long ones cut inside) instead of split at its newlines.
_LONGEST_LINE = (_LINE_LOOKAHEAD + 1) * CHUNK_CHARS
# A text's lines, each with its line break (the last one without, if the text does not end in one).
_LINES = re.compile(r"[^\n]*\n|[^\n]+")
_SPACE_MARKER = "\u2581"
_Piece = sentencepiece_model_pb2.ModelProto.SentencePiece  # type: ignore[attr-defined]
# Pieces that BPE can form from text (byte, control and unknown pieces are never matched against text).
_TEXT_PIECES = (_Piece.NORMAL, _Piece.USER_DEFINED, _Piece.UNUSED)


class TokenEncoder(Protocol):
    vocab_size: int

    def encode(self, text: str) -> np.ndarray:
        """The token ids of `text` (uint32), exactly as one call of the tokenizer on the whole text gives."""
        ...


class SafeCuts:
    """Where a text may be cut without changing its BPE ids: between two characters no piece holds together."""

    def __init__(self, pieces: list[str]) -> None:
        self.pairs = frozenset(piece[i : i + 2] for piece in pieces for i in range(len(piece) - 1))
        # Every line break a safe cut on both sides: no piece holds a newline (every tokenizer trained here).
        self.at_line_breaks = not any("\n" in pair for pair in self.pairs)

    @classmethod
    def of_model(cls, model: sentencepiece_model_pb2.ModelProto) -> SafeCuts | None:  # type: ignore[name-defined]
        """The cut rule for this model, or None when cutting could change its ids (see the module doc)."""
        normalizer, trainer = model.normalizer_spec, model.trainer_spec
        if (
            trainer.model_type != sentencepiece_model_pb2.TrainerSpec.BPE  # type: ignore[attr-defined]
            or normalizer.precompiled_charsmap
            or normalizer.add_dummy_prefix
            or normalizer.remove_extra_whitespaces
            or not trainer.byte_fallback
        ):
            return None
        # The normalizer turns spaces into the marker, so a piece's marker stands for a space in the text (and
        # for itself, should the text hold one).
        pieces = [p.piece for p in model.pieces if p.type in _TEXT_PIECES]
        if normalizer.escape_whitespaces:
            pieces += [piece.replace(_SPACE_MARKER, " ") for piece in pieces if _SPACE_MARKER in piece]
        return cls(pieces)

    def safe(self, text: str, at: int) -> bool:
        return text[at - 1 : at + 1] not in self.pairs

    def chunks(self, text: str, size: int = CHUNK_CHARS) -> list[str]:
        """`text` cut at safe places ("".join gives it back): at every line break where all are safe, a line longer
        than the look-ahead cut inside into pieces of about `size`; else into pieces of about `size`."""
        if not self.at_line_breaks:
            return self._sized(text, size)
        lines = _LINES.findall(text)
        longest = (_LINE_LOOKAHEAD + 1) * size
        if max(map(len, lines), default=0) <= longest:
            return lines
        out: list[str] = []
        for line in lines:
            if len(line) > longest:
                out += self._sized(line, size)
            else:
                out.append(line)
        return out

    def _sized(self, text: str, size: int) -> list[str]:
        out: list[str] = []
        start, length = 0, len(text)
        while length - start > size:
            end = self._next_cut(text, start, size)
            if end <= start:
                break
            out.append(text[start:end])
            start = end
        out.append(text[start:])
        return out

    def _next_cut(self, text: str, start: int, size: int) -> int:
        target = start + size
        # The first line break after the target (cut after it), if the line ends soon.
        newline = text.find("\n", target, target + _LINE_LOOKAHEAD * size)
        while newline != -1 and not self.safe(text, newline + 1):
            newline = text.find("\n", newline + 1, target + _LINE_LOOKAHEAD * size)
        if newline != -1:
            return newline + 1
        # A long line: cut before a space at or before the target, else after it.
        space = text.rfind(" ", start + 1, target + 1)
        while space > start and not self.safe(text, space):
            space = text.rfind(" ", start + 1, space)
        if space > start:
            return space
        space = text.find(" ", target)
        while space != -1 and not self.safe(text, space):
            space = text.find(" ", space + 1)
        if space != -1:
            return space
        # No usable space (a script written without them): any safe pair of characters after the target.
        for at in range(target, min(len(text), target + 64 * size)):
            if self.safe(text, at):
                return at
        return len(text)


class SentencePieceEncoder:
    """A SentencePiece model encoding in chunks where that provably gives the same ids (see the module doc)."""

    def __init__(self, proto: bytes) -> None:
        self.processor = spm.SentencePieceProcessor(model_proto=proto)
        self.vocab_size = self.processor.get_piece_size()
        self.eos_id = self.processor.eos_id()
        model = sentencepiece_model_pb2.ModelProto()  # type: ignore[attr-defined]
        model.ParseFromString(proto)
        self.cuts = SafeCuts.of_model(model)
        self._arrays = _returns_arrays(self.processor)
        # Where every line break is a safe cut, a line break is also one token of its own whatever surrounds it
        # (no piece holds a newline: it is its own piece or a byte piece): its id.
        newline = self.processor.encode("\n") if self.cuts is not None and self.cuts.at_line_breaks else []
        self._newline: list[int] | None = newline if len(newline) == 1 else None

    def encode(self, text: str) -> np.ndarray:
        if self._newline is not None:
            # The lines without their line breaks, the newline's id put back between them as the ids are joined:
            # about 4% fewer instructions than handing SentencePiece the line breaks (measured with callgrind on
            # the demo books: its byte-fallback path per line, and the regex that keeps them).
            lines = text.split("\n")
            if max(map(len, lines)) <= _LONGEST_LINE:
                flat = sentencepiece_flat_ids(self.processor, lines, self._newline)
                if flat is not None:
                    return flat.astype(np.uint32)
        pieces = [text] if self.cuts is None else self.cuts.chunks(text)
        # One call for all chunks: the batch API, on this process's one thread (the workers are the parallelism),
        # its ids as one buffer (a NumPy array per line costs about 5% of the encoding).
        flat = sentencepiece_flat_ids(self.processor, pieces)
        if flat is not None:
            return flat.astype(np.uint32)
        if self._arrays:
            encoded = self.processor.encode(pieces, num_threads=1, return_type="numpy")
            return np.concatenate(encoded, dtype=np.uint32, casting="unsafe")
        ids = array.array("i")
        for piece in self.processor.encode(pieces, num_threads=1):
            ids.extend(piece)
        return np.frombuffer(ids, dtype=np.int32).astype(np.uint32)


def _returns_arrays(processor: spm.SentencePieceProcessor) -> bool:
    """Whether this SentencePiece returns NumPy arrays (return_type="numpy", since 0.2.1): no Python int per id."""
    try:
        return isinstance(processor.encode(["a"], num_threads=1, return_type="numpy")[0], np.ndarray)
    except (TypeError, ValueError):
        return False


class HFTokenizerEncoder:
    """A Hugging Face tokenizer.json: the ids `tokenizer.encode(text, add_special_tokens=False)` gives, with the
    strings of special tokens read as plain text.

    add_special_tokens=False: a post-processor (one that adds BOS, say) would put tokens into the middle of the
    packed stream; documents are separated by EOS only. Special strings as text (`encode_special_tokens`,
    transformers' split_special_tokens): "<|endoftext|>" written inside a document is text about a token, not
    the end of the document, as in GPT-2's own pipelines (tiktoken's encode_ordinary in nanoGPT's
    openwebtext/prepare.py); a corpus cannot then forge a document boundary or any other control token.
    Added tokens that are not special (whitespace runs of some tokenizers) are matched as encode matches them.
    """

    def __init__(self, data: bytes) -> None:
        from data_prep.hf_tokenizer import parse_tokenizer, vocab_size

        self.tokenizer: Any = parse_tokenizer(data, "the tokenizer file")
        self.tokenizer.encode_special_tokens = True
        self.vocab_size = vocab_size(self.tokenizer)
        # encode_batch_fast: tokenizers 0.20.2 and later.
        self._encode_batch = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)
        # One thread per worker process: the workers are the parallelism. Left on, each worker would start a
        # Rayon pool of all cores whose threads spin between calls.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"

    def encode(self, text: str) -> np.ndarray:
        # The batch API's "fast" variant gives the same ids without computing character offsets (a third less
        # time than encode on whole books).
        (encoding,) = self._encode_batch([text], add_special_tokens=False)
        return np.array(encoding.ids, dtype=np.uint32)


def load_encoder(data: bytes) -> TokenEncoder:
    """The encoder for a tokenizer file's bytes: a SentencePiece model or a Hugging Face tokenizer.json."""
    return HFTokenizerEncoder(data) if is_hf_tokenizer(data) else SentencePieceEncoder(data)
