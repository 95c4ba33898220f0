"""Which character encoding a file is in, and decoding it without losing a letter.

`input_encoding=auto` (the default) decides per file, in this order:

1. a byte-order mark: UTF-8, UTF-16 or UTF-32 with BOM (checked before anything else, since UTF-16 text is
   full of NUL bytes that would otherwise make it look binary);
2. valid UTF-8 (ASCII included): UTF-8;
3. mostly valid UTF-8 (more valid multi-byte characters than invalid sequences): a damaged UTF-8 file, decoded
   as UTF-8 with each invalid sequence replaced by U+FFFD and counted;
4. otherwise a legacy encoding, detected by charset-normalizer (maintained, pure Python, and what `requests`
   uses). A mostly-English book with a handful of accented letters gives it little evidence: it then ties
   cp1250 with cp1252 and picks cp1250, which turns "Brunetière" into "Brunetiče" (two books of the demo
   corpus), or even prefers Shift-JIS for a German line in English prose. Among the candidates about as
   plausible as its best, cp1252 (the superset of latin-1 that web browsers use for "latin-1") is therefore
   preferred; a Central European, Cyrillic, Greek, Chinese, Japanese or Korean text still gets its own
   encoding, since there cp1252 is not among them (tests/data_prep/test_encodings.py). Evidence can be too
   thin to decide (one Russian or Turkish line in an English file): `input_encoding=` then says it.

A file decoded in a legacy encoding never contains U+FFFD; undecodable sequences (only possible in UTF-8/16/32)
are replaced and counted. `input_encoding=<codec>` forces one Python codec for every file (a BOM of that codec
is still dropped).
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass

import charset_normalizer

AUTO = "auto"
# Longest first: the UTF-32 little-endian BOM begins with the UTF-16 one.
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)
# The code page preferred among candidates charset-normalizer finds equally plausible (see the module doc).
PREFERRED_LEGACY = "cp1252"
# How close cp1252 must come to charset-normalizer's best to be preferred: its "chaos" (mess) within this much
# of the least, its language coherence within this much of the most among those.
_CHAOS_SLACK, _COHERENCE_SLACK = 0.1, 0.05
# Bytes of a large file that detection looks at (charset-normalizer samples within them).
DETECTION_BYTES = 4 << 20


def canonical(codec: str) -> str:
    """The codec's canonical Python name ("latin-1" -> "iso8859-1", "UTF8" -> "utf-8"); LookupError if unknown."""
    return codecs.lookup(codec).name


def bom_codec(head: bytes) -> str | None:
    for bom, codec in _BOMS:
        if head.startswith(bom):
            return codec
    return None


class _ReplacementCounter:
    """A codec error handler that replaces each undecodable sequence by U+FFFD and counts them."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, error: UnicodeError) -> tuple[str, int]:
        assert isinstance(error, UnicodeDecodeError)
        self.count += 1
        return "\ufffd", error.end


_counter = _ReplacementCounter()
# The error handler's name, for decoders that take one (codecs, io.TextIOWrapper).
COUNT_REPLACE = "data_prep_count_replace"
codecs.register_error(COUNT_REPLACE, _counter)


def replacements() -> int:
    """Sequences replaced through COUNT_REPLACE in this process so far."""
    return _counter.count


def decode_counting(data: bytes, codec: str) -> tuple[str, int]:
    """Decode, replacing each undecodable sequence by U+FFFD; returns the text and the number replaced."""
    before = _counter.count
    text = data.decode(codec, errors=COUNT_REPLACE)
    return text, _counter.count - before


def detect(data: bytes) -> str:
    """The encoding of a file whose content (or first DETECTION_BYTES) is `data`; see the module doc."""
    from_bom = bom_codec(data)
    if from_bom is not None:
        return from_bom
    sample = data[:DETECTION_BYTES]
    try:
        sample.decode("utf-8")
        return "utf-8"
    except UnicodeDecodeError as error:
        if error.start >= len(sample) - 3 and len(data) > len(sample):
            return "utf-8"  # only the cut at the sample's end splits a character
    text, invalid = decode_counting(sample, "utf-8")
    valid_multibyte = len(text) - len(text.encode("ascii", "ignore")) - invalid
    if valid_multibyte > invalid:
        return "utf-8"
    return _legacy(sample) or "utf-8"


def _legacy(sample: bytes) -> str | None:
    matches = charset_normalizer.from_bytes(sample)
    best = matches.best()
    if best is None:
        return None
    plausible = [match for match in matches if match.chaos <= best.chaos + _CHAOS_SLACK]
    coherent = max(match.coherence for match in plausible) - _COHERENCE_SLACK
    if any(PREFERRED_LEGACY in m.could_be_from_charset and m.coherence >= coherent for m in plausible):
        return PREFERRED_LEGACY
    return canonical(best.encoding)


@dataclass(frozen=True)
class Decoded:
    text: str
    codec: str  # the codec decoded with ("utf-8-sig" for UTF-8 with a BOM); reported_name() names its encoding
    replaced: int  # undecodable sequences replaced by U+FFFD


def decode_file(data: bytes, input_encoding: str = AUTO) -> Decoded:
    """A whole file's text: in its detected encoding (or `input_encoding`), without its byte-order mark."""
    codec = detect(data) if input_encoding == AUTO else _with_bom(data, input_encoding)
    text, replaced = decode_counting(data, codec)
    return Decoded(text.removeprefix("\ufeff"), codec, replaced)


def _with_bom(data: bytes, forced: str) -> str:
    # A forced UTF-8 file may still open with a BOM; "utf-8-sig" drops it (and reads the rest identically).
    if canonical(forced) == "utf-8" and data.startswith(codecs.BOM_UTF8):
        return "utf-8-sig"
    return forced


def _reported(codec: str) -> str:
    """The name counted in the manifest: UTF-8 with or without its BOM is UTF-8."""
    name = canonical(codec)
    return "utf-8" if name == "utf-8-sig" else name


def stream_codec(head: bytes, input_encoding: str = AUTO) -> str:
    """The encoding of a file read line by line (JSONL), decided from its first DETECTION_BYTES."""
    if input_encoding != AUTO:
        return _with_bom(head, input_encoding)
    return detect(head)


def reported_name(codec: str) -> str:
    return _reported(codec)


def is_byte_line_codec(codec: str) -> bool:
    """Whether b"\\n" separates lines in this encoding (not in UTF-16/32, where a newline is 2 or 4 bytes)."""
    return not canonical(codec).startswith(("utf-16", "utf-32"))
