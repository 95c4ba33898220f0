"""Export to Hugging Face transformers: real trained runs of both architectures, exported, then loaded offline
by transformers in a fresh process, as a user would. Its logits, token ids and generations must equal ours."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain.core.callbacks.metrics_file import read_metrics
from pretrain.core.model import GPT
from pretrain.core.model_config import ModelConfig
from pretrain.core.trained_model import load_trained_model
from pretrain.export import export_problems, hf_config, hf_state_dict
from pretrain.generate import GenerateConfig, generate_ids
from pretrain.hf.gpt import from_hf
from tests.support import run_distributed, run_module, tiny_run_args

ARCHITECTURES = {
    "pre": ("model.norm=pre", "model.activation=gelu_tanh"),
    # The original GPT: post-LN with the tanh GELU (what transformers' OpenAIGPT computes).
    "post": ("model.norm=post", "model.activation=gelu_tanh"),
}
# Unicode the vocabulary lacks (byte fallback), digits (split one by one) and whitespace runs.
HARD_TEXT = "Café naïve — 你好, 😀!  Two  spaces,   three,\ttab\t\ttabs\n\n\nnewlines 1234567890 3.14 </s> <s>\n  end "
PROMPT = "It was"

# Runs in a fresh interpreter with only transformers, offline, as a user with the exported directory would.
HF_SCRIPT = r"""
import json, sys
import numpy as np, torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

texts = json.loads(open(sys.argv[1], encoding="utf-8").read())
for export_dir in sys.argv[2:]:
    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    model = AutoModelForCausalLM.from_pretrained(export_dir).float().eval()
    ids = {name: tokenizer(text)["input_ids"] for name, text in texts.items()}  # EOS first: the prompt convention
    with torch.no_grad():
        window = ids["paragraph"][: model.config.n_positions]
        np.save(f"{export_dir}.logits.npy", model(torch.tensor([window])).logits[0].numpy())
        prompt = torch.tensor([ids["prompt"]])
        greedy = model.generate(prompt, max_new_tokens=12, do_sample=False)[0, prompt.shape[1] :].tolist()
    generated = pipeline("text-generation", model=export_dir)(texts["prompt"], max_new_tokens=8, do_sample=False)
    result = {
        "architecture": type(model).__name__,
        "ids": ids,
        "decoded": {name: tokenizer.decode(value, skip_special_tokens=True) for name, value in ids.items()},
        "greedy": greedy,
        "pipeline": generated[0]["generated_text"],
        "special_ids": [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id],
    }
    json.dump(result, open(f"{export_dir}.result.json", "w", encoding="utf-8"))
"""


def real_paragraph(corpus: Path) -> str:
    """A paragraph of a real book, short enough to fit the context with room to spare."""
    book = sorted(corpus.glob("*.txt"))[0].read_text(encoding="utf-8", errors="replace")
    paragraphs = [p for p in book.split("\n\n") if 300 <= len(p) <= 600]
    return paragraphs[len(paragraphs) // 2]


def train_and_export(norm: str, data: Path, root: Path) -> tuple[Path, Path]:
    run, out = root / "run", root / "hf"
    run_distributed(
        1,
        "pretrain",
        *tiny_run_args(
            data,
            run,
            *ARCHITECTURES[norm],
            "train.log_interval=5",
            "train.max_steps=20",
            "eval.samples=16",
            # One run with energy tracking (the model card reports it), one without (the card says so).
            f"carbon.enabled={norm == 'post'}",
        ),
    )
    done = run_module("pretrain.export", f"run_dir={run}", f"out={out}", check=True)
    assert done.stdout.strip() == f"exported {run}/checkpoints/step-00000020 to {out}"
    return run, out


@pytest.fixture(scope="module")
def exports(tiny_dataset: Path, small_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """For each architecture: a trained run, its export, and what transformers makes of the export."""
    root = tmp_path_factory.mktemp("export")
    made = {norm: train_and_export(norm, tiny_dataset, root / norm) for norm in ARCHITECTURES}
    texts = {"paragraph": real_paragraph(small_corpus), "hard": HARD_TEXT, "prompt": PROMPT}
    (root / "texts.json").write_text(json.dumps(texts), encoding="utf-8")
    subprocess.run(
        [sys.executable, "-c", HF_SCRIPT, str(root / "texts.json"), *(str(out) for _, out in made.values())],
        cwd=root,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
        check=True,
        capture_output=True,
        timeout=300,
    )
    return {
        norm: {
            "norm": norm,
            "run": run,
            "out": out,
            "texts": texts,
            "hf": json.loads(Path(f"{out}.result.json").read_text(encoding="utf-8")),
            "logits": np.load(f"{out}.logits.npy"),
        }
        for norm, (run, out) in made.items()
    }


@pytest.fixture(params=sorted(ARCHITECTURES))
def exported(request: pytest.FixtureRequest, exports: dict[str, dict]) -> dict:
    return exports[request.param]


def test_transformers_logits_equal_ours(exported: dict) -> None:
    expected_class = {"pre": "GPT2LMHeadModel", "post": "OpenAIGPTLMHeadModel"}[exported["norm"]]
    assert exported["hf"]["architecture"] == expected_class
    loaded = load_trained_model(str(exported["run"]))
    eos = loaded.tokenizer.eos_id
    ids = [eos, *loaded.tokenizer.encode(exported["texts"]["paragraph"])][: loaded.model.config.max_seq_len]
    with torch.no_grad():
        ours = loaded.model(torch.tensor([ids]))[0].numpy()
    theirs = exported["logits"]
    assert theirs.shape == ours.shape and len(ids) > 50
    difference = float(np.abs(theirs - ours).max())
    print(f"{expected_class}: max |logit difference| {difference:.2e} over {len(ids)} tokens")
    assert difference < 1e-4


def test_tokenizer_gives_sentencepiece_ids_and_decodes_back(exported: dict) -> None:
    loaded = load_trained_model(str(exported["run"]))
    for name, text in exported["texts"].items():
        # The prompt convention: EOS (2) first, as documents start after EOS in training, then SentencePiece's ids.
        assert exported["hf"]["ids"][name] == [2, *loaded.tokenizer.encode(text)], name
        assert exported["hf"]["decoded"][name] == text, name
    assert exported["hf"]["special_ids"] == [2, 2, 3, 0]  # bos (= EOS), eos, pad, unk


def test_generation_in_transformers_equals_pretrain_generate(exported: dict) -> None:
    loaded = load_trained_model(str(exported["run"]))
    eos = loaded.tokenizer.eos_id
    ours = generate_ids(
        loaded.model, [eos, *loaded.tokenizer.encode(PROMPT)], GenerateConfig(max_new_tokens=12, temperature=0), eos
    )
    theirs = exported["hf"]["greedy"]
    assert theirs[: len(ours)] == ours and theirs[len(ours) :] in ([], [eos])  # transformers keeps the EOS
    # pipeline() with greedy decoding gives the text of our generate (top_k=1), prompt included.
    shorter = generate_ids(
        loaded.model, [eos, *loaded.tokenizer.encode(PROMPT)], GenerateConfig(max_new_tokens=8, top_k=1), eos
    )
    assert exported["hf"]["pipeline"] == PROMPT + loaded.tokenizer.decode(shorter)
    assert len(exported["hf"]["pipeline"]) > len(PROMPT)


def test_export_directory_and_model_card(exported: dict) -> None:
    out, run = exported["out"], exported["run"]
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert {"generation_config.json", "README.md"} <= names
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary directory left
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2
    card = (out / "README.md").read_text(encoding="utf-8")
    state = json.loads((run / "checkpoints" / "step-00000020" / "trainer_state.json").read_text())
    assert f"{state['trainer']['consumed_tokens']:,}" in card  # tokens seen
    final = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in line][-1]
    assert f"Validation loss {final['val_loss']:.4f}" in card
    manifest = json.loads((Path(state["data_dir"]) / "manifest.json").read_text())
    assert f"{manifest['documents']:,} documents, {manifest['tokens']:,} tokens" in card  # the training data
    tracked = [e for e in read_metrics(run / "metrics.jsonl") if "energy_kwh" in e]
    if exported["norm"] == "post" and tracked:  # CodeCarbon measured the run
        assert f"energy: {tracked[-1]['energy_kwh']:.4g} kWh (to step 20)" in card
        assert f"emissions: {tracked[-1]['emissions_kg_co2eq']:.4g} kg CO2eq" in card
    else:
        assert not tracked and "Not recorded for this run." in card


def test_an_existing_directory_is_refused_in_one_line(exports: dict[str, dict]) -> None:
    exported = exports["pre"]
    done = run_module("pretrain.export", f"run_dir={exported['run']}", f"out={exported['out']}")
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1].startswith("error: out=")
    assert "overwrite=true" in done.stderr and "Traceback" not in done.stderr


VARIANTS = {
    "pre-gelu_tanh": {},
    "pre-gelu-exact": {"activation": "gelu"},
    "pre-no-bias": {"bias": False},
    "pre-mlp-ratio-2": {"mlp_ratio": 2},
    "post-gelu_tanh": {"norm": "post"},
    "post-no-bias": {"norm": "post", "bias": False},
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_conversion_is_exact_for_every_exportable_config(variant: str) -> None:
    """Random, far-from-initial weights (biases and norms included, so a swapped tensor shows) in every
    config the export accepts: transformers computes the same logits."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = ModelConfig(vocab_size=101, n_layer=3, n_head=4, d_model=32, max_seq_len=48, **VARIANTS[variant])
    ours = GPT(config).eval()
    with torch.no_grad():
        for parameter in ours.parameters():
            parameter.normal_(0.0, 0.2)
    assert not export_problems(config).messages
    theirs = AutoModelForCausalLM.from_config(hf_config(config, {"eos_token_id": 2}, "float32")).eval()
    missing, unexpected = theirs.load_state_dict(hf_state_dict(ours), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to the token embedding
    ids = torch.randint(0, 101, (2, 48))
    with torch.no_grad():
        difference = float((theirs(ids).logits - ours(ids)).abs().max())
    assert difference < 1e-4, difference
    if config.bias:  # and back (import_hf's direction of the same table): every tensor identical
        back = from_hf(config, theirs.state_dict(), "test")
        mine = {k: v for k, v in ours.state_dict().items() if k != "lm_head.weight"}
        assert set(back) == set(mine) and all(torch.equal(back[k], mine[k]) for k in mine)


def test_configs_transformers_cannot_compute_exactly_are_refused() -> None:
    problems = export_problems(ModelConfig(vocab_size=101, norm="post", activation="gelu", mlp_ratio=2)).messages
    assert len(problems) == 2
    assert problems[0].startswith("model.activation='gelu'") and "gelu_tanh" in problems[0]
    assert problems[1].startswith("model.mlp_ratio=2")
