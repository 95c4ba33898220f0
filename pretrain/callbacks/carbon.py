"""Energy and emissions with CodeCarbon, one tracker per node. Implementation: see the run-tracking issue."""

from __future__ import annotations

from dataclasses import dataclass

from pretrain.callbacks.base import Callback


@dataclass
class CarbonConfig:
    enabled: bool = True
    # Offline mode: no network; the grid's carbon intensity comes from this country (ISO 3166-1 alpha-3).
    country_iso_code: str = "USA"
    region: str | None = None
    # Stop training gracefully (checkpoint, message, exit 0) once the run's total reaches this; None: no budget.
    max_kg_co2eq: float | None = None


class CarbonTracker(Callback):
    state_key = "carbon"

    def __init__(self, config: CarbonConfig) -> None:
        self.config = config
