"""Every config group and experiment file composes into its typed schema (Hydra done well, STYLE.md)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from common.app import CONF_DIR
from data_prep.config import PrepConfig
from data_prep.config import register_configs as register_prep
from pretrain.core.config import RunConfig
from pretrain.core.config import register_configs as register_train
from pretrain.core.model import GPT

CONF = Path(CONF_DIR)


def typed(config_name: str, overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return OmegaConf.to_object(compose(config_name=config_name, overrides=overrides))


@pytest.mark.parametrize("preset", sorted(p.stem for p in (CONF / "model").glob("*.yaml")))
def test_every_model_preset_composes_and_builds(preset: str) -> None:
    register_train()
    config = typed("train", [f"model={preset}"])
    assert isinstance(config, RunConfig) and config.model.name == preset
    assert not config.model.problems().messages
    if preset in ("tiny", "gpt1", "gpt2-small"):  # build the smaller ones: the shapes are consistent
        config.model.vocab_size = 512
        GPT(config.model)


def test_gpt_presets_have_their_published_sizes() -> None:
    register_train()
    expected = {"gpt2-small": 124, "gpt2-medium": 355, "gpt2-large": 774, "gpt2-xl": 1558, "gpt1": 117}
    for preset, millions in expected.items():
        model = typed("train", [f"model={preset}"]).model
        vocab = 40478 if preset == "gpt1" else 50257
        assert abs(model.num_params(vocab) / 1e6 - millions) / millions < 0.02, preset


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_every_experiment_composes(experiment: str) -> None:
    register_train()
    config = typed("train", [f"experiment={experiment}"])
    assert isinstance(config, RunConfig)
    assert not config.problems().messages


@pytest.mark.parametrize("corpus", sorted(p.stem for p in (CONF / "corpus").glob("*.yaml")))
def test_every_corpus_composes(corpus: str) -> None:
    register_prep()
    config = typed("prep", [f"corpus={corpus}", "output_dir=/tmp/x"])
    assert isinstance(config, PrepConfig) and config.corpus is not None and config.corpus.name == corpus
