"""Run a Hydra app so that user errors print one line and exit non-zero.

Every entry point (`python -m data_prep`, `python -m pretrain`, ...) composes its config with Hydra, turns it
into its typed dataclass with `OmegaConf.to_object` and hands it to a task function, which first raises the
config's `problems()` (each dataclass checks its own fields; the task adds what needs more, such as a dataset).
A `UserError` anywhere becomes `error: <message>` on stderr and exit code 2.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import hydra
from omegaconf import DictConfig, OmegaConf

from common.errors import UserError

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
EXIT_USER_ERROR = 2

T = TypeVar("T")


def report_user_error(error: UserError) -> None:
    print(f"error: {error}", file=sys.stderr, flush=True)


def run_app(config_name: str, task: Callable[[Any], int | None]) -> None:
    """Compose `conf/<config_name>.yaml` from the command line and run `task(typed_config)`."""

    @hydra.main(version_base="1.3", config_path=CONF_DIR, config_name=config_name)
    def _main(cfg: DictConfig) -> None:
        try:
            typed = OmegaConf.to_object(cfg)
            code = task(typed)
        except UserError as error:
            report_user_error(error)
            sys.exit(EXIT_USER_ERROR)
        if code:
            sys.exit(code)

    _main()


def to_yaml(config: Any) -> str:
    """The resolved config of a typed dataclass, as YAML (for logs, manifests and checkpoints)."""
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def to_container(config: Any) -> dict[str, Any]:
    container = OmegaConf.to_container(OmegaConf.structured(config), resolve=True)
    assert isinstance(container, dict)
    return container  # type: ignore[return-value]
