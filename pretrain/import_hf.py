"""`python -m pretrain.import_hf hf_dir=DIR run_dir=RUN`: a Hugging Face GPT as a run directory to train further.

DIR is a local transformers directory of a `GPT2LMHeadModel` (pre-LN) or an `OpenAIGPTLMHeadModel` (post-LN):
config.json, the weights (model.safetensors, or pytorch_model.bin read with torch.load(weights_only=True); sharded
files through their index too) and the tokenizer (tokenizer.json). RUN gets one checkpoint, step 0, that holds
what every checkpoint holds (the model's shape, the tokenizer file as it is, trainer_state.json) and the weights
in the portable form (pretrain/core/portable.py), which any ZeRO stage, rank count or pipeline depth loads. Then:

    python -m data_prep input=... output_dir=DATA tokenizer.hf_path=DIR      # the corpus in the model's ids
    python -m pretrain run_dir=RUN data_dir=DATA experiment=finetune         # no model=: the run's

The weights map through pretrain/hf/gpt.py, the table export uses the other way; a config our model cannot
compute exactly is refused, one line naming the key. The import verifies itself before the run appears: the
model loaded by transformers and ours give the same logits on a probe text (`tolerance`).

Only vocab.json and merges.txt (no tokenizer.json): transformers builds the same byte-level BPE from them
(AutoTokenizer), whose tokenizer.json is stored in the run; encode the corpus with tokenizer.hf_path=RUN's
checkpoint directory then (it holds that tokenizer.json), since DIR has none.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.core.config_store import ConfigStore

from common.app import run_app, to_container
from common.errors import ConfigProblems, UserError
from common.files import write_bytes_atomic, write_json_atomic, write_text_atomic
from pretrain.core.config import RunConfig
from pretrain.core.model import GPT
from pretrain.core.model_config import ModelConfig
from pretrain.core.portable import PortableState, write_portable
from pretrain.core.run_dir import RunDir
from pretrain.core.run_tokenizer import FILE_NAMES, HF, HFTokenizer, end_of_text_id
from pretrain.hf.gpt import PROBE_TEXT, architecture, from_hf, max_logit_difference, model_config_from_hf


@dataclass
class ImportConfig:
    # A local transformers directory: config.json, model.safetensors or pytorch_model.bin, tokenizer.json.
    hf_dir: str | None = None
    # The run directory to create (it must not hold a run yet).
    run_dir: str | None = None
    # Our model has one dropout rate; unset: the config's (resid_pdrop, embd_pdrop and attn_pdrop must agree).
    dropout: float | None = None
    # The token that separates documents; unset: the eos_token of tokenizer_config.json, else of
    # special_tokens_map.json, else the tokenizer's end-of-text token (<|endoftext|>, </s>...), else config.json's
    # eos_token_id (data_prep's tokenizer.hf_path finds the same one).
    eos_token: str | None = None
    # Compare transformers' logits with ours on a probe text before the run is written.
    verify: bool = True
    # Largest |logit difference| verify accepts (gelu_new vs torch's tanh GELU: ~1e-6).
    tolerance: float = 1e-4

    def problems(self) -> ConfigProblems:
        problems = ConfigProblems()
        problems.check(bool(self.hf_dir), "hf_dir", self.hf_dir, "give the Hugging Face model directory: hf_dir=DIR")
        problems.check(bool(self.run_dir), "run_dir", self.run_dir, "give the run directory to create: run_dir=RUN")
        problems.check(self.dropout is None or 0 <= self.dropout < 1, "dropout", self.dropout, "must be in [0, 1)")
        problems.check(self.tolerance > 0, "tolerance", self.tolerance, "must be > 0")
        return problems


def _read_json(path: Path) -> dict[str, Any]:
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UserError(f"{path} cannot be read ({error})") from None
    if not isinstance(loaded, dict):
        raise UserError(f"{path} is not a JSON object")
    return loaded


def read_weights(hf_dir: Path) -> tuple[dict[str, torch.Tensor], str]:
    """Every tensor of the model's weight files, and which files they came from."""
    from safetensors.torch import load_file

    for single, index in (
        ("model.safetensors", "model.safetensors.index.json"),
        ("pytorch_model.bin", "pytorch_model.bin.index.json"),
    ):
        if (hf_dir / single).is_file():
            files = [hf_dir / single]
        elif (hf_dir / index).is_file():
            files = [hf_dir / name for name in sorted(set(_read_json(hf_dir / index)["weight_map"].values()))]
        else:
            continue
        tensors: dict[str, torch.Tensor] = {}
        for path in files:
            try:
                if path.suffix == ".safetensors":
                    tensors.update(load_file(str(path)))
                else:  # pickles run code unless restricted to tensors
                    tensors.update(torch.load(path, map_location="cpu", weights_only=True))
            except Exception as error:  # safetensors' and torch's own errors for a corrupt or truncated file
                raise UserError(f"{path} cannot be read ({str(error).splitlines()[0][:200]})") from None
        return tensors, ", ".join(path.name for path in files)
    raise UserError(f"hf_dir={str(hf_dir)!r} holds no model.safetensors or pytorch_model.bin")


def read_tokenizer(hf_dir: Path) -> tuple[bytes, str]:
    """The tokenizer.json's bytes as the directory holds them; built by transformers from vocab.json and
    merges.txt when that is all there is. Returns the bytes and where they came from."""
    if (hf_dir / "tokenizer.json").is_file():
        return (hf_dir / "tokenizer.json").read_bytes(), "tokenizer.json"
    if (hf_dir / "vocab.json").is_file() and (hf_dir / "merges.txt").is_file():
        from transformers import AutoTokenizer

        built = AutoTokenizer.from_pretrained(str(hf_dir))
        backend = getattr(built, "backend_tokenizer", None)
        if backend is None:
            raise UserError(f"hf_dir={str(hf_dir)!r}: transformers cannot build a tokenizer.json from its vocab files")
        return backend.to_str().encode("utf-8"), "vocab.json + merges.txt (tokenizer.json built by transformers)"
    raise UserError(f"hf_dir={str(hf_dir)!r} holds no tokenizer.json (nor vocab.json + merges.txt)")


def eos_token_id(hf_dir: Path, tokenizer: HFTokenizer, config: dict[str, Any], named: str | None) -> int:
    """The separator of documents: named, or what the directory's files say, or the end-of-text token."""
    vocab = tokenizer.tokenizer.get_vocab(with_added_tokens=True)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):  # as data_prep's tokenizer.hf_path reads
        if named is None and (hf_dir / name).is_file():
            token = _read_json(hf_dir / name).get("eos_token")
            named = token.get("content") if isinstance(token, dict) else token
    if named is not None:
        if named not in vocab:
            raise UserError(f"eos_token={named!r} is not a token of {hf_dir}/tokenizer.json")
        return int(vocab[named])
    found = end_of_text_id(tokenizer.specials)
    if found is None and isinstance(config.get("eos_token_id"), int) and config["eos_token_id"] < tokenizer.vocab_size:
        found = int(config["eos_token_id"])
    if found is None:
        raise UserError(
            f"hf_dir={str(hf_dir)!r}: its tokenizer names no end-of-text token (special tokens: "
            f"{sorted(tokenizer.specials.values())}); name the token that separates documents: eos_token=..."
        )
    return found


@torch.no_grad()
def verify(hf_dir: Path, model: GPT, tokenizer: HFTokenizer) -> float:
    """Largest |logit difference| between transformers' model of hf_dir and ours, on the probe text."""
    from transformers import AutoModelForCausalLM

    theirs = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    ids = torch.tensor([[tokenizer.eos_id, *tokenizer.encode(PROBE_TEXT)][: model.config.max_seq_len]])
    return max_logit_difference(theirs, model.eval(), ids)


def checkpoint_state(run_dir: str, model: ModelConfig, tokenizer: bytes, eos: int, origin: dict[str, Any]) -> dict:
    """trainer_state.json of the imported step 0: what any checkpoint holds, nothing trained, no data read."""
    from pretrain.core.trainer import TrainerState

    return {
        "trainer": asdict(TrainerState()),
        "callbacks": {},
        "tokenizer_sha256": hashlib.sha256(tokenizer).hexdigest(),
        "special_ids": {"eos": eos},
        "world_size": 1,
        "zero_stage": 0,
        "pipeline_stages": 1,
        "config": to_container(RunConfig(run_dir=run_dir, model=model)),
        "model": asdict(model),
        "seq_len": model.max_seq_len,
        # Only the portable weights (no DeepSpeed files): every layout loads them (reshard.py).
        "portable_only": True,
        "imported_from": origin,
    }


def write_run(root: Path, model: GPT, state: dict[str, Any], tokenizer: bytes) -> None:
    """RUN with its step-0 checkpoint, written beside it and renamed: it appears whole or not at all."""
    temp = root.parent / f".{root.name}.import-{os.getpid()}"
    shutil.rmtree(temp, ignore_errors=True)
    try:
        run = RunDir(temp)
        checkpoint = run.checkpoint(0)
        checkpoint.path.mkdir(parents=True)
        parameters = dict(model.named_parameters())  # the tied head once, as wte.weight
        shapes = [(name, tuple(parameter.shape)) for name, parameter in parameters.items()]
        portable = PortableState(
            adam_step=None,
            schedule_epoch=0,
            global_steps=0,
            global_samples=0,
            skipped_steps=0,
            source_tag=checkpoint.tag,
            source_layout=f"imported from {state['imported_from']['hf_dir']}",
        )
        write_portable(checkpoint.portable, shapes, portable, lambda _kind, name: parameters[name].detach().float())
        write_bytes_atomic(checkpoint.tokenizer_file(FILE_NAMES[HF]), tokenizer)
        write_json_atomic(checkpoint.state_file, state)
        write_text_atomic(checkpoint.complete_marker, f"{checkpoint.tag}\n")
        write_text_atomic(run.latest_pointer, f"{checkpoint.tag}\n")
        if root.is_dir():
            root.rmdir()  # empty (checked): a directory made for the run
        temp.rename(root)
    except OSError as error:
        raise UserError(f"run_dir={str(root)!r} cannot be written ({error})") from None
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def import_model(config: ImportConfig) -> dict[str, Any]:
    try:
        import transformers  # noqa: F401  (fail before the work, with the fix)
    except ImportError:
        raise UserError("importing needs transformers: pip install '.[hf]'") from None
    hf_dir, root = Path(config.hf_dir or ""), Path(config.run_dir or "")
    if not (hf_dir / "config.json").is_file():
        raise UserError(f"hf_dir={config.hf_dir!r} has no config.json: not a transformers model directory")
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise UserError(f"run_dir={config.run_dir!r} exists and is not empty; import into a new run directory")
    raw = _read_json(hf_dir / "config.json")
    model_config = model_config_from_hf(raw, f"{hf_dir}/config.json", config.dropout)
    tokenizer_bytes, tokenizer_source = read_tokenizer(hf_dir)
    tokenizer = HFTokenizer(tokenizer_bytes)
    tokenizer = HFTokenizer(tokenizer_bytes, eos_token_id(hf_dir, tokenizer, raw, config.eos_token))
    if tokenizer.vocab_size > (model_config.vocab_size or 0):
        raise UserError(
            f"hf_dir={config.hf_dir!r}: the tokenizer has {tokenizer.vocab_size} ids, the model's vocab_size is "
            f"{model_config.vocab_size}: ids past it have no embedding"
        )
    weights, weight_files = read_weights(hf_dir)
    model = GPT(model_config)
    missing, _ = model.load_state_dict(from_hf(model_config, weights, f"{hf_dir}/{weight_files}"), strict=False)
    if set(missing) - {"lm_head.weight"}:  # the tied head is wte.weight; from_hf refuses unexpected names
        raise RuntimeError(f"weights missing after the mapping: {sorted(missing)}")
    difference = verify(hf_dir, model, tokenizer) if config.verify else None
    if difference is not None and not difference <= config.tolerance:
        raise RuntimeError(
            f"our model's logits differ from transformers' by {difference:.3g} (tolerance {config.tolerance}): "
            "the mapping is wrong for this config; nothing was written"
        )
    origin = {
        "hf_dir": str(hf_dir.resolve()),
        "architecture": architecture(model_config),
        "weights": weight_files,
        "tokenizer": tokenizer_source,
    }
    state = checkpoint_state(str(root), model_config, tokenizer_bytes, tokenizer.eos_id, origin)
    write_run(root, model, state, tokenizer_bytes)
    return {**origin, "run_dir": str(root), "max_abs_logit_diff": difference, "config": model_config}


def run(config: ImportConfig) -> int:
    config.problems().raise_if_any()
    result = import_model(config)
    model: ModelConfig = result["config"]
    if result["max_abs_logit_diff"] is not None:
        print(f"# verified: logits within {result['max_abs_logit_diff']:.2e} of transformers'", file=sys.stderr)
    print(
        f"imported {result['hf_dir']} ({result['architecture']}: {model.n_layer} layers, d_model {model.d_model}, "
        f"vocab {model.vocab_size}, context {model.max_seq_len}; tokenizer from {result['tokenizer']}) as "
        f"{RunDir(result['run_dir']).checkpoint(0).path}",
        flush=True,
    )
    return 0


def main() -> None:
    ConfigStore.instance().store(name="import_hf_schema", node=ImportConfig)
    run_app("import_hf", run)


if __name__ == "__main__":
    main()
