"""`python -m pretrain.export run_dir=RUN out=DIR`: a checkpoint as a Hugging Face transformers directory.

DIR holds config.json, model.safetensors, the tokenizer (pretrain/hf/tokenizer.py), generation_config.json and
a README.md model card. It loads offline with `AutoModelForCausalLM.from_pretrained(DIR)` and
`AutoTokenizer.from_pretrained(DIR)`, no remote code, and runs in `pipeline("text-generation", model=DIR)`.

Which transformers class computes exactly our model, and how the weights map: pretrain/hf/gpt.py (the table
python -m pretrain.import_hf reads them back with). model.doc_mask changes nothing here: within one document
attention is causal either way (transformers does not block attention across packed documents).

The tokenizer: a run on SentencePiece data gets its model rebuilt as an identical `tokenizers` pipeline
(pretrain/hf/tokenizer.py); a run on a Hugging Face tokenizer (imported, or a corpus encoded with
tokenizer.hf_path) exports its tokenizer.json as it is. Either way the tokenizer starts every text with EOS,
as a document starts after EOS in training and as `python -m pretrain.generate` starts a prompt: EOS is the
tokenizer's bos_token, added by `add_bos_token` (and, for the rebuilt one, by tokenizer.json's post-processor),
so `pipeline("text-generation")` continues a prompt exactly as our generate does.
Checkpoints are read by pretrain/core/trained_model.py, so whatever layouts it reads (ZeRO 0-3, pipelines) export.

Conversions elsewhere have been a known source of silent garbage, so the export verifies itself before it is
moved into place: it loads DIR with transformers and compares logits and token ids with ours (`verify`).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.core.config_store import ConfigStore

from common.app import run_app
from common.errors import ConfigProblems, UserError
from data_prep.manifest import MANIFEST_NAME
from pretrain.core.callbacks.metrics_file import read_metrics
from pretrain.core.mixture import MixtureState
from pretrain.core.model import GPT
from pretrain.core.run_dir import RunDir
from pretrain.core.trained_model import TrainedModel, training_data_dirs
from pretrain.hf.gpt import PROBE_TEXT, architecture, export_problems, hf_config, max_logit_difference, to_hf

__all__ = ["export_problems", "hf_config", "hf_state_dict"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ExportConfig:
    # A run directory (its latest complete checkpoint is used) or an explicit checkpoint directory.
    run_dir: str | None = None
    checkpoint: str | None = None
    # The directory to write; it must not exist, unless overwrite=true and it holds an earlier export.
    out: str | None = None
    overwrite: bool = False
    # Weights' dtype in model.safetensors: float32, bfloat16 or float16.
    dtype: str = "float32"
    # Load the export with transformers and compare its logits and token ids with ours before finishing.
    verify: bool = True
    # Largest |logit difference| verify accepts (fp32 computations in another order differ by ~1e-6).
    tolerance: float = 1e-3

    def problems(self) -> ConfigProblems:
        problems = ConfigProblems()
        problems.check(bool(self.out), "out", self.out, "give the directory to write: out=DIR")
        problems.check(self.dtype in DTYPES, "dtype", self.dtype, f"must be one of {', '.join(DTYPES)}")
        problems.check(self.tolerance > 0, "tolerance", self.tolerance, "must be > 0")
        return problems


def hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our weights under transformers' names (pretrain/hf/gpt.py's table)."""
    return to_hf(model.config, model.state_dict())


def write_model(model: GPT, specials: dict[str, int], out: Path, dtype: str) -> None:
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    from pretrain.generate import GenerateConfig

    hf_config(model.config, specials, dtype).save_pretrained(out)
    tensors = {name: tensor.to(DTYPES[dtype]) for name, tensor in hf_state_dict(model).items()}
    # transformers refuses safetensors files without the "format" metadata.
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    # Sampling defaults are pretrain.generate's, so both sample alike out of the box.
    defaults = GenerateConfig()
    GenerationConfig(
        do_sample=True,
        temperature=defaults.temperature,
        top_k=defaults.top_k,
        top_p=defaults.top_p,
        max_new_tokens=defaults.max_new_tokens,
        **specials,
    ).save_pretrained(out)


@torch.no_grad()
def verify(out: Path, model: GPT, tokenizer: Any, dtype: str) -> dict[str, Any]:
    """Load `out` with transformers as a user would; compare token ids, decoding and logits with ours."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    theirs_tokenizer = AutoTokenizer.from_pretrained(out)
    expected = [tokenizer.eos_id, *tokenizer.encode(PROBE_TEXT)]  # the prompt convention: EOS first
    got = theirs_tokenizer(PROBE_TEXT)["input_ids"]
    decoded = theirs_tokenizer.decode(expected, skip_special_tokens=True)
    if got != expected or decoded != tokenizer.decode(expected):
        raise RuntimeError(f"exported tokenizer differs from the run's: ids {got} vs {expected}, text {decoded!r}")
    theirs = AutoModelForCausalLM.from_pretrained(out).float().eval()
    # Ours with the exported precision's rounding, so only the conversion is measured.
    reference = copy.deepcopy(model).cpu().to(DTYPES[dtype]).float().eval()
    ids = torch.tensor([expected[: model.config.max_seq_len]])
    difference = max_logit_difference(theirs, reference, ids)
    return {"architecture": type(theirs).__name__, "max_abs_logit_diff": difference, "probe_tokens": ids.shape[1]}


def _last(entries: list[dict[str, Any]], key: str, step: int) -> dict[str, Any] | None:
    """The latest metrics entry holding `key` at or before the exported step."""
    found = [e for e in entries if key in e and e.get("step", 0) <= step]
    return found[-1] if found else None


def _dataset_line(data_dir: Path) -> str:
    manifest_path = data_dir / MANIFEST_NAME
    if not manifest_path.is_file():
        return f"- `{data_dir}` (its manifest was not available at export time)."
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    prep = manifest.get("config", {})
    source = prep.get("corpus") or ", ".join(map(str, prep.get("input") or [])) or "?"
    splits = manifest.get("splits", {})
    return (
        f"- `{data_dir}`: {source}; {manifest['documents']:,} documents, {manifest['tokens']:,} tokens "
        f"({splits.get('train', {}).get('samples', 0):,} training and {splits.get('val', {}).get('samples', 0):,} "
        f"validation samples of {manifest['seq_len']} tokens), from {manifest.get('inputs', {}).get('files', '?')} "
        "input files."
    )


def model_card(loaded: TrainedModel, checked: dict[str, Any]) -> str:
    """README.md: what the model is, what it was trained on and for how long, how well, at what energy cost."""
    state, config = loaded.state, loaded.model.config
    run_dir = RunDir(loaded.checkpoint.path.parent.parent)
    step, trainer = state["trainer"]["step"], state["trainer"]
    exported_as = architecture(config)
    imported = state.get("imported_from")
    origin = (
        f"imported from `{imported['hf_dir']}` ({imported['architecture']}) and trained further"
        if imported
        else ("trained from scratch")
    )
    kind = (
        "SentencePiece BPE, byte fallback"
        if loaded.tokenizer.kind == "sentencepiece"
        else "Hugging Face tokenizer.json"
    )
    params = config.num_params(config.vocab_size or 0)
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        f"tags: [{'openai-gpt' if config.norm == 'post' else 'gpt2'}, gpt-pretrain]",
        "---",
        f"# {run_dir.root.name}",
        "",
        f"A {params / 1e6:.1f} M-parameter GPT {origin} with gpt-pretrain, exported as `{exported_as}`.",
        "",
        "| | |",
        "|---|---|",
        f"| architecture | {config.norm}-LN, {config.n_layer} layers, {config.n_head} heads, d_model {config.d_model}, "
        f"{config.activation} |",
        f"| context | {config.max_seq_len} tokens |",
        f"| vocabulary | {config.vocab_size} ({kind}) |",
        f"| checkpoint | {loaded.checkpoint.tag} (step {step}) |",
        f"| tokens seen | {trainer['consumed_tokens']:,} ({trainer['consumed_samples']:,} samples) |",
        f"| training | world size {state.get('world_size', '?')}, ZeRO stage {state.get('zero_stage', '?')}, "
        f"precision {state['config'].get('precision', '?')}, lr {state['config']['train']['lr']} |",
        "",
        "## Training data",
        "",
    ]
    for data_dir in map(Path, training_data_dirs(state)):
        lines.append(_dataset_line(data_dir))
    if "data_dirs" in state and "mixture" in state:
        mixture = MixtureState.from_state_dict(state["mixture"])
        lines.append("")
        lines += [f"Mixture from step {s.step:,}: {mixture.describe(s.units)}." for s in mixture.segments]
    metrics = read_metrics(run_dir.metrics)
    lines += ["", "## Evaluation", ""]
    evaluation = _last(metrics, "val_loss", step)
    lines.append(
        f"Validation loss {evaluation['val_loss']:.4f} (perplexity {evaluation['val_perplexity']:.2f}) at step "
        f"{evaluation['step']}, on {evaluation.get('eval_samples', '?')} held-out samples."
        if evaluation
        else "No validation loss was recorded."
    )
    lines += ["", "## Energy and emissions", ""]
    energy, emissions = _last(metrics, "energy_kwh", step), _last(metrics, "emissions_kg_co2eq", step)
    if energy or emissions:
        if energy:
            lines.append(f"- energy: {energy['energy_kwh']:.4g} kWh (to step {energy['step']})")
        if emissions:
            lines.append(f"- emissions: {emissions['emissions_kg_co2eq']:.4g} kg CO2eq (to step {emissions['step']})")
    else:
        lines.append("Not recorded for this run.")
    eos_text = loaded.tokenizer.token_text(loaded.tokenizer.eos_id)
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from transformers import pipeline",
        'generate = pipeline("text-generation", model="PATH/TO/THIS/DIR")',
        'print(generate("It was a dark and stormy night", max_new_tokens=50)[0]["generated_text"])',
        "```",
        "",
        f"In training every document follows the end-of-text token `{eos_text}` (id {loaded.tokenizer.eos_id}), so "
        "the tokenizer starts every text with it (it is the bos_token): greedy decoding here gives the text "
        "`python -m pretrain.generate top_k=1` gives. Otherwise its ids are the run's tokenizer's.",
    ]
    if checked:
        lines += [
            "",
            f"Conversion checked at export: logits within {checked['max_abs_logit_diff']:.1e} of the training code's "
            f"on {checked['probe_tokens']} tokens; identical token ids.",
        ]
    return "\n".join(lines) + "\n"


def check_out(config: ExportConfig) -> Path:
    """The directory to write, refused before any work when it holds something other than an earlier export."""
    out = Path(config.out or "")
    occupied = any(out.iterdir()) if out.is_dir() else out.exists()
    if occupied and not config.overwrite:
        raise UserError(f"out={config.out!r} exists; give another directory or overwrite=true")
    if occupied and not (out / "config.json").is_file():
        raise UserError(f"out={config.out!r} is not an earlier export (no config.json); overwrite refuses it")
    return out


def make_temp(out: Path) -> Path:
    """An empty directory beside `out`: the export is written there and renamed, so it appears whole or not at all."""
    temp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(temp, ignore_errors=True)
        temp.mkdir()
    except OSError as error:
        raise UserError(f"out={str(out)!r} cannot be written: {error.strerror}") from None
    return temp


def export(config: ExportConfig) -> dict[str, Any]:
    try:
        import transformers  # noqa: F401  (fail before the work, with the fix)
    except ImportError:
        raise UserError("exporting needs transformers: pip install '.[hf]'") from None
    from pretrain.core.trained_model import load_trained_model
    from pretrain.hf.tokenizer import write_tokenizer

    out = check_out(config)
    loaded = load_trained_model(config.run_dir, config.checkpoint, "cpu")
    model_config = loaded.model.config
    export_problems(model_config).raise_if_any(f"{loaded.checkpoint.path} cannot be exported exactly")
    tokenizer = loaded.tokenizer
    temp = make_temp(out)
    try:
        specials = write_tokenizer(tokenizer, temp, model_config.max_seq_len)
        write_model(loaded.model, specials, temp, config.dtype)
        checked = verify(temp, loaded.model, tokenizer, config.dtype) if config.verify else {}
        if checked and not checked["max_abs_logit_diff"] <= config.tolerance:
            raise RuntimeError(
                f"exported model's logits differ from ours by {checked['max_abs_logit_diff']:.3g} "
                f"(tolerance {config.tolerance}): the conversion is wrong for this config; nothing was written"
            )
        (temp / "README.md").write_text(model_card(loaded, checked), encoding="utf-8")
        _make_readable(temp)
        if out.exists():
            shutil.rmtree(out)
        temp.rename(out)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return {"out": str(out), "checkpoint": str(loaded.checkpoint.path), **checked}


def _make_readable(directory: Path) -> None:
    # safetensors writes its file owner-only (0600); the export is meant to be shared like the other files.
    umask = os.umask(0)
    os.umask(umask)
    for path in directory.iterdir():
        path.chmod(0o666 & ~umask)


def run(config: ExportConfig) -> int:
    config.problems().raise_if_any()
    result = export(config)
    if "max_abs_logit_diff" in result:
        print(
            f"# verified: {result['architecture']} logits within {result['max_abs_logit_diff']:.2e} of ours on "
            f"{result['probe_tokens']} tokens; tokenizer ids identical",
            file=sys.stderr,
        )
    print(f"exported {result['checkpoint']} to {result['out']}", flush=True)
    return 0


def main() -> None:
    ConfigStore.instance().store(name="export_schema", node=ExportConfig)
    run_app("export", run)


if __name__ == "__main__":
    main()
