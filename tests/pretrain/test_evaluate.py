"""`python -m pretrain.evaluate` and sampling from checkpoints of different ZeRO stages, on real 2-rank runs.

The trainer's own evaluation (metrics.jsonl) is the reference: evaluating its checkpoint in one process
must give the same validation loss, whatever ZeRO stage partitioned the weights.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

from pretrain.core.callbacks.metrics_file import read_metrics
from pretrain.core.trained_model import load_trained_model
from pretrain.evaluate import EvaluateConfig
from pretrain.evaluate import evaluate as run_evaluation
from pretrain.generate import GenerateConfig, generate_ids
from tests.support import complete_checkpoints, run_distributed, run_module, tiny_run_args

EVAL_SAMPLES = 16


def train_args(data: Path, run: Path, *extra: str) -> list[str]:
    return tiny_run_args(
        data,
        run,
        "train.log_interval=5",
        "train.max_steps=20",
        "eval.interval=0",  # one evaluation, at the end, of the weights the final checkpoint holds
        f"eval.samples={EVAL_SAMPLES}",
        *extra,
    )


@pytest.fixture(scope="module")
def runs(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """The same training (seed, data, batch) on 2 ranks with ZeRO-0 and with ZeRO-3."""
    found = {}
    for stage in (0, 3):
        run = tmp_path_factory.mktemp(f"zero{stage}")
        run_distributed(2, "pretrain", *train_args(tiny_dataset, run, f"zero_stage={stage}"))
        found[stage] = run
    return found


def final_eval(run: Path) -> dict:
    return [e for e in read_metrics(run / "metrics.jsonl") if e["kind"] == "eval"][-1]


def evaluate(*args: str, tmp_path: Path) -> dict:
    output = tmp_path / "result.json"
    done = run_module("pretrain.evaluate", *args, f"output={output}", check=True)
    assert done.stdout.count("\n") == 1 and "bits/byte" in done.stdout  # one summary line on stdout
    return json.loads(output.read_text())


@pytest.mark.parametrize("stage", [0, 3])
def test_val_loss_equals_the_trainers_final_evaluation(stage: int, runs: dict[int, Path], tmp_path: Path) -> None:
    expected = final_eval(runs[stage])
    got = evaluate(f"run_dir={runs[stage]}", tmp_path=tmp_path)
    assert got["step"] == expected["step"] == 20
    assert got["sequences"] == expected["eval_samples"] == EVAL_SAMPLES  # the run's eval.samples by default
    assert abs(got["loss"] - expected["val_loss"]) < 1e-4, (got["loss"], expected["val_loss"])
    assert math.isclose(got["perplexity"], math.exp(got["loss"]))
    assert 0 < got["bits_per_byte"] < 8


def test_bits_per_byte_of_a_text_file(runs: dict[int, Path], small_corpus: Path, tmp_path: Path) -> None:
    book = sorted(small_corpus.glob("*.txt"))[0].read_text(encoding="utf-8", errors="replace")
    # A real passage (Windows line endings, which cleaning normalizes) and text the vocabulary lacks.
    passage = book[len(book) // 2 : len(book) // 2 + 6000].replace("\n", "\r\n") + "\nCafé 你好 😀\t 2024!\n"
    text_file = tmp_path / "passage.txt"
    text_file.write_bytes(passage.encode("utf-8"))
    got = evaluate(f"run_dir={runs[0]}", f"text_file={text_file}", tmp_path=tmp_path)
    cleaned = passage.replace("\r\n", "\n")
    tokenizer = spm.SentencePieceProcessor(model_file=str(complete_checkpoints(runs[0])[-1] / "tokenizer.model"))
    assert got["tokens"] == len(tokenizer.encode(cleaned))  # every token predicted once (after a leading EOS)
    assert got["bytes"] == len(cleaned.encode("utf-8"))  # bytes of the evaluated text, exactly
    assert got["context"] == 64  # the run's training length
    assert math.isfinite(got["bits_per_byte"]) and 0 < got["bits_per_byte"] < 8
    assert math.isclose(got["bits_per_byte"], got["loss"] * got["tokens"] / math.log(2) / got["bytes"])


def test_bad_paths_give_one_clean_line(runs: dict[int, Path], tmp_path: Path) -> None:
    for args in (
        [f"run_dir={tmp_path / 'missing'}"],
        [f"run_dir={runs[0]}", f"text_file={tmp_path / 'missing.txt'}"],
        [f"run_dir={runs[0]}", f"data_dir={tmp_path}"],
    ):
        done = run_module("pretrain.evaluate", *args)
        assert done.returncode == 2, done.stderr
        assert done.stderr.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in done.stderr
        assert done.stdout == ""


def test_samples_select_the_first_validation_samples_whatever_the_batch(runs: dict[int, Path]) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # 5 samples in batches of 2 pad the last batch: padding must not count.
    uneven, _ = run_evaluation(EvaluateConfig(run_dir=str(runs[0]), samples=5, batch_size=2, device=device))
    whole, _ = run_evaluation(EvaluateConfig(run_dir=str(runs[0]), samples=5, batch_size=5))
    assert uneven.sequences == whole.sequences == 5 and uneven.tokens == whole.tokens == 5 * 64
    assert abs(uneven.loss - whole.loss) < 1e-6 and uneven.bytes == whole.bytes


@torch.no_grad()
def test_zero3_checkpoint_generates_what_zero0_generates(runs: dict[int, Path]) -> None:
    """Same training on ZeRO-0 and ZeRO-3: the weights reassembled from ZeRO-3's partitions are ZeRO-0's, and
    generation (greedy, and sampled with a seed; with and without the KV cache) gives the same tokens."""
    zero0, zero3 = (load_trained_model(str(runs[stage])) for stage in (0, 3))
    weights0, weights3 = zero0.model.state_dict(), zero3.model.state_dict()
    assert weights0.keys() == weights3.keys()
    assert max(float((weights0[k] - weights3[k]).abs().max()) for k in weights0) < 1e-5
    eos = zero0.tokenizer.eos_id
    prompt = [eos, *zero0.tokenizer.encode("It was")]
    # A barely trained model's greedy choice is often a newline; sampling shows that whole distributions agree.
    for options in ({"temperature": 0.0}, {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "seed": 7}):
        generated = {
            (stage, cache): generate_ids(
                loaded.model,
                prompt,
                GenerateConfig(max_new_tokens=24, stop_at_eos=False, use_cache=cache, **options),
                eos,
            )
            for stage, loaded in ((0, zero0), (3, zero3))
            for cache in (True, False)
        }
        reference = generated[(0, True)]
        assert len(reference) == 24 and all(tokens == reference for tokens in generated.values()), (options, generated)
    assert len(set(reference)) > 5, zero0.tokenizer.decode(reference)  # varied text, not one repeated token
