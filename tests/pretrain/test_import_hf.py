"""Start from a Hugging Face GPT: random-weight GPT2LMHeadModel and OpenAIGPTLMHeadModel directories with a
byte-level BPE trained on real books (tests/pretrain/hf_models.py), imported with `python -m pretrain.import_hf`,
then evaluated, sampled and exported by our commands and compared with what transformers computes itself."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from common.errors import UserError
from pretrain.core.trained_model import load_trained_model
from pretrain.evaluate import EvaluateConfig, evaluate, read_text
from pretrain.hf.gpt import model_config_from_hf
from pretrain.import_hf import ImportConfig, import_model
from tests.pretrain.hf_models import CONTEXT, make_hf_dir, save_tokenizer, train_byte_level_bpe
from tests.support import run_module

ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "openai-gpt": "OpenAIGPTLMHeadModel"}
# Unicode the vocabulary lacks (byte-level: any byte), digits, whitespace runs, the end-of-text token as text.
HARD_TEXT = "Café naïve — 你好, 😀!  Two  spaces,   three,\ttab\t\ttabs\n\n\nnewlines 1234567890 3.14\n  end "
PROMPT = "It was the"
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def book_texts(corpus: Path, limit: int = 400_000) -> list[str]:
    """The paragraphs of the corpus' books, up to `limit` characters."""
    texts, size = [], 0
    for book in sorted(corpus.glob("*.txt")):
        for paragraph in book.read_text(encoding="utf-8", errors="replace").split("\n\n"):
            if paragraph.strip() and size < limit:
                texts.append(paragraph)
                size += len(paragraph)
    return texts


@pytest.fixture(scope="module")
def hf(small_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Both architectures as Hugging Face directories, imported as runs."""
    os.environ.update(OFFLINE)
    root = tmp_path_factory.mktemp("import_hf")
    texts = book_texts(small_corpus)
    tokenizer = train_byte_level_bpe(texts)
    made: dict = {"root": root, "texts": texts}
    for name in ARCHITECTURES:
        hf_dir = make_hf_dir(root / name, name, tokenizer)
        run = root / f"run-{name}"
        if name == "gpt2":  # the command, as a user runs it
            done = run_module("pretrain.import_hf", f"hf_dir={hf_dir}", f"run_dir={run}", check=True)
            assert f"as {run}/checkpoints/step-00000000" in done.stdout
        else:  # the same function in this process (a second interpreter costs seconds)
            import_model(ImportConfig(hf_dir=str(hf_dir), run_dir=str(run)))
        made[name] = {"hf_dir": hf_dir, "run": run}
    return made


@pytest.fixture(scope="module")
def exported(hf: dict) -> dict:
    """Each imported run exported again, untouched."""
    from pretrain.export import ExportConfig, export

    outs = {}
    for name in ARCHITECTURES:
        out = hf["root"] / f"export-{name}"
        if name == "gpt2":  # the command, as a user runs it
            run_module("pretrain.export", f"run_dir={hf[name]['run']}", f"out={out}", check=True)
        else:  # the same function in this process
            export(ExportConfig(run_dir=str(hf[name]["run"]), out=str(out)))
        outs[name] = out
    return outs


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_hf_to_ours_to_hf_gives_identical_weights_and_logits(hf: dict, exported: dict, name: str) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    hf_dir, out = hf[name]["hf_dir"], exported[name]
    original = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    again = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(again).__name__ == ARCHITECTURES[name]
    written = load_file(str(out / "model.safetensors"))
    theirs = {k: v for k, v in original.state_dict().items() if k != "lm_head.weight"}
    assert set(written) == set(theirs)
    for key, tensor in theirs.items():
        assert torch.equal(written[key], tensor), key
    ids = torch.randint(0, original.config.vocab_size, (2, CONTEXT))
    with torch.no_grad():
        difference = float((original(ids).logits - again(ids).logits).abs().max())
    assert difference < 1e-4
    # Ours, between the two: the import's own check compared it with transformers at 1e-4 already.
    loaded = load_trained_model(str(hf[name]["run"]))
    with torch.no_grad():
        assert float((loaded.model(ids) - original(ids).logits).abs().max()) < 1e-4


def test_run_tokenizer_gives_the_hugging_face_ids(hf: dict, exported: dict) -> None:
    from transformers import AutoTokenizer

    loaded = load_trained_model(str(hf["gpt2"]["run"]))
    theirs = AutoTokenizer.from_pretrained(hf["gpt2"]["hf_dir"])
    again = AutoTokenizer.from_pretrained(exported["gpt2"])
    eos = theirs.convert_tokens_to_ids("<|endoftext|>")
    assert loaded.tokenizer.eos_id == eos
    for text in (hf["texts"][3], hf["texts"][40], HARD_TEXT, "<|endoftext|> inside"):
        # A special token's string in text is text (as data_prep encodes it): split_special_tokens.
        ids = theirs(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        assert loaded.tokenizer.encode(text) == ids and eos not in ids
        assert loaded.tokenizer.decode(ids) == text
        # The exported tokenizer: the same ids after EOS (the prompt convention), decoding back to the text.
        assert again(text)["input_ids"] == [eos, *ids]
        assert again.decode([eos, *ids], skip_special_tokens=True) == text
    # The run holds the tokenizer.json byte for byte.
    assert loaded.tokenizer.data == (hf["gpt2"]["hf_dir"] / "tokenizer.json").read_bytes()


def test_bits_per_byte_counts_each_tokens_bytes(hf: dict) -> None:
    loaded = load_trained_model(str(hf["gpt2"]["run"]))
    lengths = loaded.tokenizer.byte_lengths()
    for text in (HARD_TEXT, hf["texts"][7]):
        ids = loaded.tokenizer.encode(text)
        assert int(lengths[ids].sum()) == len(text.encode("utf-8"))
    assert lengths[loaded.tokenizer.eos_id] == 0


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_evaluate_equals_transformers_loss_over_the_same_windows(hf: dict, exported: dict, name: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text_file, context = hf["root"] / "eval.txt", 40
    text_file.write_text("\n\n".join(hf["texts"][200:215]), encoding="utf-8")
    ours, _ = evaluate(EvaluateConfig(run_dir=str(hf[name]["run"]), text_file=str(text_file), context=context))
    # The guides' computation: the exported tokenizer (EOS first), windows of context + 1 overlapping by one,
    # transformers' own shifted loss per window, weighted by the tokens each predicts.
    tokenizer = AutoTokenizer.from_pretrained(exported[name])
    model = AutoModelForCausalLM.from_pretrained(exported[name], dtype=torch.float32).eval()
    ids = tokenizer(read_text(text_file))["input_ids"]
    total, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, context):
            window = torch.tensor([ids[start : start + context + 1]])
            predicted = window.shape[1] - 1
            total += float(model(window, labels=window).loss) * predicted
            tokens += predicted
    assert ours.tokens == tokens == len(ids) - 1
    assert math.isclose(ours.loss, total / tokens, rel_tol=1e-4), (ours.loss, total / tokens)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_pipeline_greedy_text_equals_our_generate(
    hf: dict, exported: dict, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import pipeline

    from pretrain.generate import GenerateConfig, run

    run(GenerateConfig(run_dir=str(hf[name]["run"]), prompt=PROMPT, top_k=1, max_new_tokens=24, device="cpu"))
    ours = capsys.readouterr().out
    generate = pipeline("text-generation", model=str(exported[name]))
    theirs = generate(PROMPT, max_new_tokens=24, do_sample=False)[0]["generated_text"]
    assert ours == theirs + "\n"
    assert len(theirs) > len(PROMPT) + 10


def test_only_vocab_and_merges_builds_the_same_tokenizer(hf: dict, tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    hf_dir = tmp_path / "vocab-merges"
    hf_dir.mkdir()
    source = hf["gpt2"]["hf_dir"]
    for name in ("config.json", "model.safetensors"):
        (hf_dir / name).write_bytes((source / name).read_bytes())
    Tokenizer.from_file(str(source / "tokenizer.json")).model.save(str(hf_dir))  # vocab.json, merges.txt
    run = tmp_path / "run"
    done = import_model(ImportConfig(hf_dir=str(hf_dir), run_dir=str(run)))
    assert done["tokenizer"].startswith("vocab.json + merges.txt")
    ours, reference = load_trained_model(str(run)).tokenizer, load_trained_model(str(hf["gpt2"]["run"])).tokenizer
    for text in (HARD_TEXT, hf["texts"][11]):
        assert ours.encode(text) == reference.encode(text)
    assert ours.eos_id == reference.eos_id
    # DIR has no tokenizer.json for data_prep: the run's checkpoint holds it, and encodes the corpus for the run.
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "book.txt").write_text("\n\n".join(hf["texts"][:300]), encoding="utf-8")
    checkpoint = run / "checkpoints" / "step-00000000"
    data = tmp_path / "data"
    run_module(
        "data_prep",
        f"input=[{corpus}]",
        f"output_dir={data}",
        f"tokenizer.hf_path={checkpoint}",
        "seq_len=32",
        "val_fraction=0.2",
        "num_workers=1",
        check=True,
    )
    manifest = json.loads((data / "manifest.json").read_text())
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert manifest["tokenizer_sha256"] == state["tokenizer_sha256"]
    assert manifest["special_ids"]["eos"] == state["special_ids"]["eos"] == ours.eos_id


REFUSED_CONFIGS = {
    "activation_function": ("relu", "activation_function='relu' cannot be imported exactly"),
    "scale_attn_by_inverse_layer_idx": (True, "scale_attn_by_inverse_layer_idx=True cannot be imported exactly"),
    "reorder_and_upcast_attn": (True, "reorder_and_upcast_attn=True"),
    "tie_word_embeddings": (False, "tie_word_embeddings=False"),
    "model_type": ("gpt_neox", "import takes GPT2LMHeadModel or OpenAIGPTLMHeadModel"),
}


@pytest.mark.parametrize("key", sorted(REFUSED_CONFIGS))
def test_configs_that_cannot_map_exactly_are_refused_naming_the_key(key: str) -> None:
    raw = {"model_type": "gpt2", "vocab_size": 100, "n_positions": 32, "n_embd": 16, "n_layer": 1, "n_head": 2}
    value, message = REFUSED_CONFIGS[key]
    with pytest.raises(Exception, match=message.replace("(", r"\(").replace("[", r"\[")):
        model_config_from_hf({**raw, key: value}, "config.json")


def test_import_refusals_are_one_line(hf: dict, tmp_path: Path) -> None:
    source = hf["gpt2"]["hf_dir"]
    hf_dir = tmp_path / "relu"
    hf_dir.mkdir()
    for name in ("model.safetensors", "tokenizer.json"):
        (hf_dir / name).write_bytes((source / name).read_bytes())
    config = json.loads((source / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**config, "activation_function": "relu"}))
    done = run_module("pretrain.import_hf", f"hf_dir={hf_dir}", f"run_dir={tmp_path / 'run'}")
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0, done.stderr
    assert "activation_function='relu' cannot be imported exactly" in done.stderr
    assert not (tmp_path / "run").exists()
    # An existing run is never overwritten.
    with pytest.raises(UserError, match="exists and is not empty; import into a new run directory"):
        import_model(ImportConfig(hf_dir=str(source), run_dir=str(hf["gpt2"]["run"])))
    # Nor its weights deleted: converting an import again would remove its only copy.
    from pretrain.convert_checkpoint import ConvertConfig
    from pretrain.convert_checkpoint import run as convert

    with pytest.raises(UserError, match=r"is an import: step-00000000\.portable\.safetensors is its only copy"):
        convert(ConvertConfig(run_dir=str(hf["gpt2"]["run"]), force=True))
    assert (hf["gpt2"]["run"] / "checkpoints" / "step-00000000.portable.safetensors").is_file()


@pytest.fixture(scope="module")
def hf_datasets(hf: dict, small_corpus: Path, tiny_dataset: Path) -> dict[str, Path]:
    """Real books encoded by `python -m data_prep ... tokenizer.hf_path=DIR`: with the model's tokenizer at
    seq_len 32 and at a seq_len past the model's context, with another byte-level BPE of the same size; and a
    SentencePiece dataset (another vocabulary)."""
    root = hf["root"]
    other = root / "other-tokenizer"
    save_tokenizer(train_byte_level_bpe(hf["texts"][::-1][:300]), other)

    def prepare(name: str, hf_dir: Path, seq_len: int) -> Path:
        out = root / name
        run_module(
            "data_prep",
            f"input=[{small_corpus}]",
            f"output_dir={out}",
            f"tokenizer.hf_path={hf_dir}",
            f"seq_len={seq_len}",
            "val_fraction=0.1",
            "num_workers=1",
            check=True,
        )
        return out

    model_dir = hf["gpt2"]["hf_dir"]
    return {
        "fits": prepare("data-fits", model_dir, 32),
        "long": prepare("data-long", model_dir, CONTEXT + 32),
        "other": prepare("data-other", other, 32),
        "sentencepiece": tiny_dataset,
    }


REFUSALS = {
    # dataset, extra overrides, what the one line names (both sides)
    "vocab": (
        "sentencepiece",
        (),
        ["model.vocab_size=1024", "data_dir=", "has 1024 ids", "(checkpoint step-00000000) 400"],
    ),
    "context": ("long", (), ["model.max_seq_len=96", f"dataset's seq_len ({CONTEXT + 32})"]),
    "tokenizer": ("other", (), ["was encoded with another tokenizer", "than run_dir="]),
    "model": (
        "fits",
        ("model=tiny",),
        ["model.n_layer=4", "has model.n_layer=2", "without model= and model.<shape>= a run continues"],
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_training_an_imported_run_refuses_what_does_not_fit(hf: dict, hf_datasets: dict, case: str) -> None:
    dataset, extra, expected = REFUSALS[case]
    run = hf["gpt2"]["run"]
    done = run_module("pretrain", f"run_dir={run}", f"data_dir={hf_datasets[dataset]}", *extra)
    assert done.returncode == 2, done.stderr
    line = done.stderr.strip().splitlines()[-1]
    for part in expected:
        assert part in line, line


def test_imported_run_fine_tunes_on_two_ranks_resumes_and_exports(hf: dict, hf_datasets: dict, tmp_path: Path) -> None:
    """The guides' workflow: the imported GPT-2 trains on a corpus data_prep encoded in its ids (2 ranks, no
    model=: a pipeline, then ZeRO-2), stops, resumes, and exports again; the tokenizer's sha256 agrees."""
    import hashlib
    import shutil

    from pretrain.core.run_dir import RunDir
    from tests.support import run_distributed

    run = tmp_path / "run"
    shutil.copytree(hf["gpt2"]["run"], run)
    data = hf_datasets["fits"]
    args = [
        f"run_dir={run}",
        f"data_dir={data}",
        "experiment=finetune",
        "train.max_steps=6",
        "train.steps_per_run=3",
        "train.micro_batch_size=2",
        "train.global_batch_size=4",
        "train.warmup_steps=1",
        "train.log_interval=1",
        "train.num_workers=1",
        "eval.interval=3",
        "eval.samples=8",
        "checkpoint.interval=3",
        "wandb.mode=disabled",
        "carbon.enabled=false",
    ]
    # The import loads into a 2-stage pipeline, whose checkpoint then resumes under ZeRO-2 on 2 data-parallel ranks.
    first = run_distributed(2, "pretrain", *args, "parallel.pipeline_stages=2", "zero_stage=1")
    assert "loading step-00000000.portable.safetensors (the import)" in first.stdout and "at step 0" in first.stdout
    second = run_distributed(2, "pretrain", *args, "zero_stage=2")
    assert "at step 3" in second.stdout and "finished 6 steps" in second.stdout
    checkpoint = RunDir(run).latest_checkpoint()
    assert checkpoint is not None and checkpoint.step == 6
    manifest = json.loads((data / "manifest.json").read_text())
    held = checkpoint.tokenizer
    assert held.name == "tokenizer.json" and held.read_bytes() == (hf["gpt2"]["hf_dir"] / "tokenizer.json").read_bytes()
    assert hashlib.sha256(held.read_bytes()).hexdigest() == manifest["tokenizer_sha256"]
    assert checkpoint.read_state()["tokenizer_sha256"] == manifest["tokenizer_sha256"]
    # Trained from the imported weights (6 small steps away from them), not from a fresh initialisation.
    imported, trained = load_trained_model(str(hf["gpt2"]["run"])).model, load_trained_model(str(run)).model
    with torch.no_grad():
        pairs = zip(imported.parameters(), trained.parameters(), strict=True)
        moved = max(float((a - b).abs().max()) for a, b in pairs)
    assert 0 < moved < 1e-3
    out = tmp_path / "export"
    done = run_module("pretrain.export", f"run_dir={run}", f"out={out}", check=True)  # verifies itself
    assert f"exported {checkpoint.path} to {out}" in done.stdout
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "imported from" in card and "Hugging Face tokenizer.json" in card
