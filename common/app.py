"""Run a Hydra app so that user errors print one line and exit non-zero.

Every entry point (`python -m data_prep`, `python -m pretrain`, ...) composes its config with Hydra, turns it
into its typed dataclass with `OmegaConf.to_object` and hands it to a task function, which first raises the
config's `problems()` (each dataclass checks its own fields; the task adds what needs more, such as a dataset).
A `UserError` anywhere becomes `error: <message>` on stderr and exit code 2.
"""

from __future__ import annotations

import re
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


def command_line_overrides() -> list[str]:
    """The overrides of this command line as Hydra parsed them (`key=value`, `+key=value`...), or none outside
    a Hydra app."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def to_yaml(config: Any) -> str:
    """The resolved config of a typed dataclass, as YAML (for logs, manifests and checkpoints)."""
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def to_container(config: Any) -> dict[str, Any]:
    container = OmegaConf.to_container(OmegaConf.structured(config), resolve=True)
    assert isinstance(container, dict)
    return container  # type: ignore[return-value]


def sweep_point() -> dict[str, Any] | None:
    """This job's point in a Hydra sweep (`-m`), or None outside one: {"id", "dir", "job", "params"}.

    The id names the sweep after its directory (`multirun/2026-11-22/10-00-00` -> `multirun_2026-11-22_10-00-00`),
    the same for every point and readable as a W&B group. `params` holds the keys the sweep varies (the
    overrides of its command line with several values, as Hydra recorded them in the sweep's multirun.yaml) and
    this point's value of each.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    hydra_config = HydraConfig.get()
    sweep_dir = Path(hydra_config.sweep.dir).absolute()
    try:
        shown = sweep_dir.relative_to(Path.cwd())
    except ValueError:
        shown = sweep_dir
    sweep_id = re.sub(r"[^A-Za-z0-9._-]+", "_", str(shown).strip("/")) or "sweep"
    parser = OverridesParser.create()
    swept: set[str] = set()
    recorded = sweep_dir / "multirun.yaml"  # written by Hydra's sweeper before the first job starts
    if recorded.is_file():
        sweep_overrides = OmegaConf.select(OmegaConf.load(recorded), "hydra.overrides.task") or []
        swept = {o.key_or_group for o in parser.parse_overrides(list(sweep_overrides)) if o.is_sweep_override()}
    job = parser.parse_overrides(list(hydra_config.overrides.task))
    params = {o.key_or_group: o.get_value_element_as_str() for o in job if o.key_or_group in swept}
    return {"id": sweep_id, "dir": str(sweep_dir), "job": int(hydra_config.job.num), "params": params}
