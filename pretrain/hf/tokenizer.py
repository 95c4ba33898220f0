"""The run's tokenizer for Hugging Face: a SentencePiece model rebuilt as a `tokenizer.json` giving the same ids,
or the run's own tokenizer.json; with the prompt convention of `write_tokenizer`.

`AutoTokenizer.from_pretrained(DIR)` loads it offline and without `trust_remote_code`: it is a plain
`tokenizers` pipeline, rebuilt from the SentencePiece model so that each stage does what SentencePiece does
with the settings data_prep trains with (data_prep/tokenizer.py):

- normalizer: identity normalization, no dummy prefix, no whitespace folding, so the only change is the
  space escaped as "▁" (U+2581);
- no pre-tokenizer: SentencePiece's BPE encodes the whole normalized text as one symbol sequence (it does not
  split at whitespace when encoding; the pieces it learned simply never span a word boundary);
- model: BPE over characters with byte fallback. SentencePiece stores no merge list, only pieces ranked by
  score: merging the adjacent pair whose concatenation is the best-scored piece is the same as applying
  merges ranked by the score of the piece they produce, so the merges are every split of every piece into
  two pieces, in that order (as transformers' own SentencePiece converter does);
- decoder: "▁" back to a space, byte pieces back to bytes.

Measured on the demo books: identical ids on every book, whole. Unigram models are refused: HF's Viterbi
breaks ties between equal-score segmentations differently (3 of 4 demo books differ), so ids would not
always match.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from common.errors import UserError
from pretrain.core.run_tokenizer import HFTokenizer, RunTokenizer

SPACE_MARKER = "\u2581"
# The transformers class that wraps a tokenizer.json as-is: no model-specific pre/post-processing, and it
# loads in transformers 4.x as well as 5.x.
TOKENIZER_CLASS = "PreTrainedTokenizerFast"


def _model_proto(proto: bytes) -> Any:
    # sentencepiece ships its protobuf schema; protobuf itself comes with wandb, a core dependency.
    from sentencepiece import sentencepiece_model_pb2

    model = sentencepiece_model_pb2.ModelProto()  # type: ignore[attr-defined]  # generated protobuf code
    model.ParseFromString(proto)
    return model


def check_exportable(model: Any) -> None:
    """Raise a UserError naming every setting this conversion cannot reproduce exactly."""
    trainer, normalizer = model.trainer_spec, model.normalizer_spec
    problems = []
    if trainer.model_type != trainer.BPE:
        problems.append(
            f"model_type={trainer.ModelType.Name(trainer.model_type).lower()} (only bpe converts exactly: "
            "Hugging Face's unigram breaks ties between equal-score segmentations differently)"
        )
    if normalizer.name != "identity" and normalizer.precompiled_charsmap:
        problems.append(f"normalization_rule_name={normalizer.name} (data_prep uses identity)")
    if normalizer.add_dummy_prefix:
        problems.append("add_dummy_prefix=true")
    if normalizer.remove_extra_whitespaces:
        problems.append("remove_extra_whitespaces=true")
    if not normalizer.escape_whitespaces:
        problems.append("escape_whitespaces=false")
    if trainer.treat_whitespace_as_suffix:
        problems.append("treat_whitespace_as_suffix=true")
    if not trainer.byte_fallback:
        problems.append("byte_fallback=false")
    kinds = model.SentencePiece.Type
    if any(piece.type == kinds.USER_DEFINED for piece in model.pieces):
        problems.append("user-defined pieces")
    if problems:
        raise UserError(
            "the run's SentencePiece model cannot be exported as an identical Hugging Face tokenizer: "
            + ", ".join(problems)
            + "; train the tokenizer with data_prep's settings"
        )


def build_tokenizer(proto: bytes) -> Any:
    """A `tokenizers.Tokenizer` giving SentencePiece's ids for any text."""
    try:
        from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
    except ImportError:
        raise UserError(
            "exporting needs the Hugging Face libraries: pip install '.[hf]' (transformers, tokenizers)"
        ) from None
    model = _model_proto(proto)
    check_exportable(model)
    kinds = model.SentencePiece.Type
    pieces = [piece.piece for piece in model.pieces]
    vocab = {piece: index for index, piece in enumerate(pieces)}
    normal = {index for index, piece in enumerate(model.pieces) if piece.type == kinds.NORMAL}
    ranked = []
    for index in normal:
        piece = pieces[index]
        for cut in range(1, len(piece)):
            left, right = vocab.get(piece[:cut]), vocab.get(piece[cut:])
            if left in normal and right in normal:
                # Best score first; ties by piece id, then by the ids of the parts (deterministic).
                ranked.append((-model.pieces[index].score, index, left, right))
    ranked.sort()
    merges = [(pieces[left], pieces[right]) for _, _, left, right in ranked]
    unk = pieces[model.trainer_spec.unk_id]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = normalizers.Replace(" ", SPACE_MARKER)
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace(SPACE_MARKER, " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    controls = [piece for piece in model.pieces if piece.type in (kinds.CONTROL, kinds.UNKNOWN)]
    tokenizer.add_special_tokens([AddedToken(p.piece, special=True, normalized=False) for p in controls])
    return tokenizer


def special_tokens(proto: bytes) -> dict[str, str]:
    """{"unk_token": "<unk>", "eos_token": "</s>", ...} for the ids the SentencePiece model defines; the bos_token
    is EOS (the prompt convention: see write_tokenizer)."""
    model = _model_proto(proto)
    spec = model.trainer_spec
    ids = {"unk_token": spec.unk_id, "bos_token": spec.eos_id, "eos_token": spec.eos_id, "pad_token": spec.pad_id}
    return {name: model.pieces[index].piece for name, index in ids.items() if 0 <= index < len(model.pieces)}


def _hf_special_tokens(tokenizer: HFTokenizer) -> dict[str, str]:
    eos = tokenizer.token_text(tokenizer.eos_id)
    found = {"bos_token": eos, "eos_token": eos}
    unk = (tokenizer.spec.get("model") or {}).get("unk_token")
    if unk:
        found["unk_token"] = unk
    return found


def write_tokenizer(tokenizer: RunTokenizer, out: Path, model_max_length: int) -> dict[str, int]:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json in `out`; returns the special ids for
    config.json and generation_config.json.

    The prompt convention: in training every document follows EOS, and `python -m pretrain.generate` starts a
    prompt with EOS; so does this tokenizer: EOS is its bos_token, prepended by tokenizer.json's post-processor,
    and `pipeline("text-generation")` then continues a prompt exactly as our generate does. (The post-processor
    has to carry it: transformers 5 drops tokenizer_config.json's add_bos_token whenever a tokenizer.json exists.)
    A SentencePiece run's tokenizer.json is built here; a Hugging Face run's is its own, with only that
    post-processor added (after its own one, if any): vocabulary, merges, pre-tokenizer and decoder unchanged.
    """
    from tokenizers import Tokenizer, processors

    eos = tokenizer.token_text(tokenizer.eos_id)
    prepend = processors.TemplateProcessing(
        single=f"{eos}:0 $A:0", pair=f"{eos}:0 $A:0 $B:1", special_tokens=[(eos, tokenizer.eos_id)]
    )
    if isinstance(tokenizer, HFTokenizer):
        built = Tokenizer.from_str(tokenizer.data.decode("utf-8"))
        own = built.post_processor
        built.post_processor = processors.Sequence([own, prepend]) if own is not None else prepend
        specials = _hf_special_tokens(tokenizer)
    else:
        built = build_tokenizer(tokenizer.data)
        built.post_processor = prepend
        specials = special_tokens(tokenizer.data)
    built.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": TOKENIZER_CLASS,
        **specials,
        "model_max_length": model_max_length,
        # data_prep never reads a special token's string in text ("</s>", "<|endoftext|>") as the special id;
        # neither does this tokenizer.
        "split_special_tokens": True,
        # Decoding must give back the text exactly, not "tidy" spaces before punctuation.
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", "utf-8")
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n", "utf-8")
    ids = {"bos_token_id": tokenizer.eos_id, "eos_token_id": tokenizer.eos_id}
    pad = specials.get("pad_token")
    ids["pad_token_id"] = _id_of(tokenizer, pad) if pad else tokenizer.eos_id
    return ids


def _id_of(tokenizer: RunTokenizer, token: str) -> int:
    for index in range(tokenizer.vocab_size):
        if tokenizer.token_text(index) == token:
            return index
    raise ValueError(f"{token} is not in the vocabulary")
