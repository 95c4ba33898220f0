"""Which resumes DeepSpeed loads as they are, which are converted, and which cannot continue at all."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from common.errors import UserError
from pretrain.core.config import RunConfig, validate_run
from pretrain.core.layout import Layout, resume_problems, run_model, weights_precision
from pretrain.core.model_config import ModelConfig

BASE = Layout(
    zero_stage=2, pipeline_stages=1, data_parallel_size=2, precision="fp32", compiled=False, partition_method=""
)


def test_only_a_change_that_keeps_every_rank_file_loads_natively() -> None:
    assert BASE.loads_natively_into(BASE)
    for other in (
        replace(BASE, data_parallel_size=1),  # ZeRO partitions over another number of ranks
        replace(BASE, zero_stage=3),
        replace(BASE, precision="bf16"),
        replace(BASE, compiled=True),  # parameter names change (_orig_mod.)
        replace(BASE, pipeline_stages=2, partition_method="parameters"),
    ):
        assert not BASE.loads_natively_into(other), other
    zero0 = replace(BASE, zero_stage=0)
    assert zero0.loads_natively_into(replace(zero0, data_parallel_size=5))  # nothing partitioned: any size
    piped = replace(zero0, pipeline_stages=2, partition_method="parameters")
    assert piped.loads_natively_into(replace(piped, data_parallel_size=1))
    assert not piped.loads_natively_into(replace(piped, partition_method="uniform"))  # other layers per stage
    bf16_pipe = replace(piped, precision="bf16")  # DeepSpeed's BF16_Optimizer partitions even at ZeRO-0
    assert bf16_pipe.partitions_optimizer and not bf16_pipe.loads_natively_into(
        replace(bf16_pipe, data_parallel_size=1)
    )


def test_layout_of_a_run_and_of_its_checkpoint_agree() -> None:
    from common.app import to_container

    config = RunConfig(zero_stage=1, precision="bf16-weights")
    config.parallel.pipeline_stages = 2
    run = Layout.of_run(config, world_size=4)
    assert run == Layout(1, 2, 2, "bf16", False, "parameters")
    state = {"zero_stage": 1, "pipeline_stages": 2, "world_size": 4, "config": to_container(config)}
    assert Layout.of_checkpoint({**state, "weights_precision": "bf16"}) == run
    # Written before precision=bf16 meant autocast: no weights_precision, and "bf16" was DeepSpeed's.
    legacy = {**state, "config": {**state["config"], "precision": "bf16"}}
    assert Layout.of_checkpoint(legacy) == run
    assert run.describe() == "ZeRO-1, 2 pipeline stages x 2 data-parallel ranks, bf16"


def test_bf16_autocast_keeps_fp32_files_so_fp32_and_bf16_resume_each_other_natively() -> None:
    from common.app import to_container

    fp32, autocast = RunConfig(zero_stage=2), RunConfig(zero_stage=2, precision="bf16")
    assert weights_precision("bf16") == "fp32" and weights_precision("bf16-weights") == "bf16"
    assert Layout.of_run(autocast, 2) == Layout.of_run(fp32, 2) == BASE
    state = {"zero_stage": 2, "world_size": 2, "config": to_container(autocast), "weights_precision": "fp32"}
    assert Layout.of_checkpoint(state).loads_natively_into(Layout.of_run(fp32, 2))


def _run_with_checkpoint(root: Path, model: ModelConfig, tokenizer_sha256: str = "abc") -> RunConfig:
    checkpoint = root / "checkpoints" / "step-00000004"
    checkpoint.mkdir(parents=True)
    state = {"trainer": {"step": 4}, "model": asdict(model), "tokenizer_sha256": tokenizer_sha256, "zero_stage": 2}
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    (checkpoint / "COMPLETE").write_text("step-00000004\n")
    config = RunConfig(run_dir=str(root))
    config.model = replace(model)
    return config


def test_another_model_or_tokenizer_is_refused_before_anything_starts(tmp_path: Path) -> None:
    trained = ModelConfig(name="tiny", vocab_size=1024, n_layer=2, n_head=2, d_model=64, max_seq_len=64)
    config = _run_with_checkpoint(tmp_path, trained)
    manifest = SimpleNamespace(vocab_size=1024, tokenizer_sha256="abc")
    assert resume_problems(config, manifest, 3).messages == []  # any world size: a layout change converts
    # What does not shape the weights may change on resume.
    config.model = replace(trained, dropout=0.1, name="renamed", doc_mask=True)
    assert resume_problems(config, manifest, 1).messages == []
    config.model = replace(trained, n_layer=4, d_model=128)
    messages = resume_problems(config, manifest, 1).messages
    assert len(messages) == 2
    assert messages[0].startswith("model.n_layer=4: the run's latest checkpoint")
    assert "has model.n_layer=2; resume with model.n_layer=2, or start a new run_dir" in messages[0]
    assert messages[1].startswith("model.d_model=128")
    config.model = trained
    other_vocabulary = SimpleNamespace(vocab_size=2048, tokenizer_sha256="def")
    messages = resume_problems(config, other_vocabulary, 1).messages
    assert "model.vocab_size=2048" in messages[0] and "use a new run_dir for this dataset" in messages[1]
    # The same checks run with every other config check, before any process group.
    config.model = replace(trained, n_layer=3)
    with pytest.raises(UserError, match=r"model\.n_layer=3: the run's latest checkpoint"):
        validate_run(config, None, 1)


def test_a_run_without_checkpoint_has_nothing_to_resume(tmp_path: Path) -> None:
    assert resume_problems(RunConfig(run_dir=str(tmp_path / "new")), None, 1).messages == []


def test_a_resumed_run_takes_its_model_from_the_checkpoint_unless_a_preset_is_given(tmp_path: Path) -> None:
    trained = ModelConfig(name="gpt2", vocab_size=400, n_layer=2, n_head=2, d_model=32, max_seq_len=96, dropout=0.1)
    config = _run_with_checkpoint(tmp_path, trained)
    config.model = ModelConfig(name="tiny", n_layer=4, n_head=4, d_model=128, max_seq_len=256, dropout=0.2)
    # No model= on the command line: the run's shape; the vocabulary stays the dataset's to check.
    adopted = run_model(config, ["data_dir=d", "train.lr=1e-5"])
    assert adopted.model == replace(trained, vocab_size=None)
    # model.<key>= stays the command line's: a training-only key changes the run, a shape key is refused.
    adopted = run_model(config, ["model.dropout=0.2"])
    assert adopted.model == replace(trained, vocab_size=None, dropout=0.2)
    assert resume_problems(adopted, None, 1).messages == []
    adopted = run_model(config, ["model.n_layer=4"])
    assert [m.split(":")[0] for m in resume_problems(adopted, None, 1).messages] == ["model.n_layer=4"]
    # model=<preset>: the preset, compared with the run's (refused when it differs).
    assert run_model(config, ["model=tiny"]) is config
    assert (
        "without model= and model.<shape>= a run continues its own model"
        in resume_problems(config, None, 1).messages[0]
    )
    # A new run directory: the config's model.
    assert run_model(replace(config, run_dir=str(tmp_path / "new")), []).model == config.model
