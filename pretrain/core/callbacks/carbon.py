"""Energy and emissions with CodeCarbon: one tracker per node, totals summed over nodes and kept across resumes.

Why one tracker per node: CodeCarbon's machine mode measures the whole node (CPU, GPU, RAM), so a tracker on
every rank would count a node once per rank (codecarbon PR #1390). Local rank 0 of each node runs the only
tracker. At every log interval (`on_log`, which every rank reaches together) each rank contributes its node's
readings if it holds the tracker and zeros otherwise, and one all-reduce sums the nodes.

Why the totals live in the checkpoint: a tracker starts from zero in every process, so a resumed run would
restart its footprint at zero. This callback's state holds the run's totals up to the checkpoint; a resumed
invocation adds its own readings to them. Each node's CodeCarbon CSV is kept as RUN/emissions/node-<n>.csv,
one row per invocation, updated at every log interval.

Logged at every log interval: energy_kwh (and cpu_/gpu_/ram_energy_kwh), emissions_kg_co2eq (run totals),
power_w (mean power of all nodes since the previous log), kg_co2eq_per_million_tokens, and
projected_kg_co2eq (the total for train.max_steps at this invocation's rate per step).

`carbon.max_kg_co2eq` is a budget: once the total reaches it (checked at each log interval and at start-up),
training stops like on a signal (checkpoint, message, exit 0). A tracker error is reported in one line and
turns that node's tracker off: measuring never stops training.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, astuple, dataclass, fields
from typing import Any

from common.errors import ConfigProblems
from pretrain.core.callbacks.base import MEASURE, Callback, Rollback, TrainerView, fail_soft
from pretrain.core.library_internals import codecarbon_countries, codecarbon_has_started, codecarbon_measure_now

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


@dataclass
class CarbonConfig:
    enabled: bool = True
    # Offline mode: no network; the grid's carbon intensity comes from this country (ISO 3166-1 alpha-3).
    country_iso_code: str = "USA"
    # A US state or Canadian province (e.g. "california") for a finer intensity; None: the country's.
    region: str | None = None
    # Stop training gracefully (checkpoint, message, exit 0) once the run's total reaches this; None: no budget.
    max_kg_co2eq: float | None = None
    # Seconds between CodeCarbon's background power samples (each log interval also takes one).
    measure_power_secs: float = 15.0
    # Power usage effectiveness of the data center: cooling and power losses on top of the machine's draw.
    pue: float = 1.0
    # CodeCarbon's own log level; "warning" shows how it measures (RAPL, TDP estimate, ...) and any failure.
    log_level: str = "error"

    def problems(self) -> ConfigProblems:
        problems = ConfigProblems()
        if not self.enabled:
            return problems
        problems.check(
            self.country_iso_code in codecarbon_countries(),
            "carbon.country_iso_code",
            self.country_iso_code,
            "is not in CodeCarbon's energy-mix table; use an ISO 3166-1 alpha-3 code such as USA, FRA, DEU",
        )
        if self.max_kg_co2eq is not None:
            problems.check(self.max_kg_co2eq > 0, "carbon.max_kg_co2eq", self.max_kg_co2eq, "must be > 0 (or null)")
        problems.check(self.measure_power_secs > 0, "carbon.measure_power_secs", self.measure_power_secs, "must be > 0")
        problems.check(self.pue >= 1.0, "carbon.pue", self.pue, "must be >= 1.0")
        problems.check(self.log_level in LOG_LEVELS, "carbon.log_level", self.log_level, f"must be one of {LOG_LEVELS}")
        return problems


@dataclass
class CarbonTotals:
    """Energy (kWh) and emissions (kg CO2eq) of one node, or summed over nodes and invocations."""

    energy_kwh: float = 0.0
    cpu_energy_kwh: float = 0.0
    gpu_energy_kwh: float = 0.0
    ram_energy_kwh: float = 0.0
    emissions_kg_co2eq: float = 0.0

    def __add__(self, other: CarbonTotals) -> CarbonTotals:
        return CarbonTotals(*(a + b for a, b in zip(astuple(self), astuple(other), strict=True)))

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> CarbonTotals:
        return cls(**{f.name: float(state.get(f.name, 0.0)) for f in fields(cls)})


def node_rank(rank: int) -> int:
    """This process's node: torchrun's GROUP_RANK, else rank // LOCAL_WORLD_SIZE (contiguous ranks per node)."""
    if "GROUP_RANK" in os.environ:
        return int(os.environ["GROUP_RANK"])
    return rank // max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)


class CarbonTracker(Callback):
    state_key = "carbon"
    order = MEASURE

    def __init__(self, config: CarbonConfig, max_steps: int) -> None:
        self.config = config
        self.max_steps = max_steps  # the planned run, for the projected total
        self.tracker: Any = None  # CodeCarbon's OfflineEmissionsTracker, on local rank 0 only
        self.node = 0
        self.restored = CarbonTotals()  # the run's totals at the checkpoint this invocation resumed from
        self.current = CarbonTotals()  # this invocation, all nodes (refreshed at each log and checkpoint)
        self._local = CarbonTotals()  # this node's latest reading (zeros on ranks without a tracker)
        self._local_measured = False  # this node's tracker has produced a reading in this invocation
        self._nodes_measured = 0
        self._active = False  # between on_train_start and on_train_end
        self._start_step = 0
        self._last_time = 0.0
        self._last_energy = 0.0
        self._projection_printed = False
        self._trainer: TrainerView | None = None  # for the collective refresh inside state_dict

    # ------------------------------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: TrainerView) -> None:
        if not self.config.enabled:
            return
        self._active = True
        self._trainer = trainer
        self._start_step = trainer.state.step
        # A resumed run whose budget is already spent stops before its first step (every rank read the same
        # checkpoint, so every rank agrees), with nothing to measure.
        self._check_budget(trainer, self.restored.emissions_kg_co2eq)
        if trainer.world.local_rank == 0 and trainer.outcome is None:
            self.node = node_rank(trainer.world.rank)
            self._guard(self._start_tracker, trainer)
        self._last_time = time.monotonic()  # energy counts from the tracker's start, and so does power_w's clock

    def on_log(self, trainer: TrainerView, metrics: dict[str, Any]) -> None:
        if not self._active:
            return
        now = time.monotonic()
        self._refresh(trainer)
        if not self._nodes_measured:
            return  # every tracker failed before its first reading (reported): no figures rather than zeros
        total = self.restored + self.current
        emissions = total.emissions_kg_co2eq
        steps_here = trainer.state.step - self._start_step
        per_step = self.current.emissions_kg_co2eq / steps_here if steps_here else math.nan
        max_steps = self.max_steps
        projected = emissions + per_step * max(max_steps - trainer.state.step, 0)
        tokens = trainer.state.consumed_tokens
        metrics.update(asdict(total))
        metrics["power_w"] = (self.current.energy_kwh - self._last_energy) * 3.6e6 / max(now - self._last_time, 1e-9)
        metrics["kg_co2eq_per_million_tokens"] = emissions / tokens * 1e6 if tokens else math.nan
        metrics["projected_kg_co2eq"] = projected
        self._last_time, self._last_energy = now, self.current.energy_kwh
        if trainer.world.is_main and not self._projection_printed:
            self._projection_printed = True
            self._print_projection(trainer, total, projected, per_step)
        self._check_budget(trainer, emissions)

    def on_rollback(self, trainer: TrainerView, rollback: Rollback) -> None:
        # The energy spent on the undone steps stays spent; the per-step projection counts from the checkpoint.
        self._start_step = min(self._start_step, rollback.to_step)

    def on_train_end(self, trainer: TrainerView) -> None:
        if not self._active:
            return
        # The final reading comes from stopping the tracker, so the CSV's last row and the totals saved in the
        # final checkpoint are the same figures. (The end-of-run evaluation and checkpoint write that follow
        # are not measured: seconds, against a whole run.)
        self._refresh(trainer, final=True)
        self._active = False
        if trainer.world.is_main and self._nodes_measured:
            total = self.restored + self.current
            print(
                f"carbon: {self.current.energy_kwh:.4g} kWh, {self.current.emissions_kg_co2eq:.4g} kg CO2eq in this "
                f"invocation ({self._nodes_measured} node(s)); run total {total.energy_kwh:.4g} kWh, "
                f"{total.emissions_kg_co2eq:.4g} kg CO2eq",
                flush=True,
            )

    def state_dict(self) -> dict[str, Any]:
        if not self.config.enabled:
            return {}
        if self._active and self._trainer is not None:
            # Totals as of this checkpoint. save_checkpoint is collective (every rank calls it, hence this, at
            # the same point), so the all-reduce inside is safe.
            self._refresh(self._trainer)
        return asdict(self.restored + self.current)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.restored = CarbonTotals.from_state(state)

    # ------------------------------------------------------------------------------------ measuring
    def _start_tracker(self, trainer: TrainerView) -> None:
        from codecarbon import OfflineEmissionsTracker, OutputMethod

        # CodeCarbon logs before it reads its log_level argument; quiet it from the start.
        logging.getLogger("codecarbon").setLevel(self.config.log_level.upper())
        csv = trainer.run_dir.emissions_csv(self.node)
        csv.parent.mkdir(parents=True, exist_ok=True)
        tracker = OfflineEmissionsTracker(
            country_iso_code=self.config.country_iso_code,
            region=self.config.region,
            project_name=trainer.run_dir.name,
            output_dir=str(csv.parent),
            output_file=csv.name,
            output_methods=[OutputMethod.CSV],
            # "update": one row per invocation (CodeCarbon run id), rewritten at each reading.
            on_csv_write="update",
            # Readings happen at our log intervals; CodeCarbon's own periodic output would race with them.
            api_call_interval=-1,
            measure_power_secs=self.config.measure_power_secs,
            pue=self.config.pue,
            tracking_mode="machine",
            log_level=self.config.log_level,
        )
        tracker.start()
        # CodeCarbon's constructor and start() catch their own errors and only log them.
        if not codecarbon_has_started(tracker):
            raise RuntimeError("CodeCarbon's tracker did not start; run with carbon.log_level=warning to see why")
        self.tracker = tracker
        hardware = tracker.get_detected_hardware()
        print(
            f"carbon: CodeCarbon measures node {self.node} ({hardware.get('cpu_model')}, "
            f"{hardware.get('gpu_count') or 0} GPU(s), {hardware.get('ram_total_size') or 0:.0f} GB RAM) "
            f"-> {csv}",
            flush=True,
        )

    def _read_local(self, final: bool) -> None:
        tracker = self.tracker
        if final:
            tracker.stop()
            self.tracker = None
            data = getattr(tracker, "final_emissions_data", None)
            if data is None:
                raise RuntimeError("CodeCarbon's tracker did not stop cleanly")
        else:
            # Not tracker.flush(): it swallows errors, returns only the kg, and skips samples under 50 ms old,
            # which would leave short log intervals with no energy (power_w 0 W, then double).
            data = codecarbon_measure_now(tracker)
        self._local = CarbonTotals(
            data.energy_consumed, data.cpu_energy, data.gpu_energy, data.ram_energy, data.emissions
        )
        self._local_measured = True

    def _refresh(self, trainer: TrainerView, final: bool = False) -> None:
        """Collective: every rank calls it together. Sums the nodes' readings into self.current."""
        if self.tracker is not None:
            self._guard(self._read_local, final)
        # A failed tracker keeps contributing its last good reading, so the totals never go backwards.
        local = [*astuple(self._local), float(self._local_measured)]
        summed = trainer.all_reduce_sum(local)
        self.current = CarbonTotals(*summed[:-1])
        self._nodes_measured = round(summed[-1])

    def _guard(self, action: Any, *args: Any) -> None:
        fail_soft(f"carbon tracking of node {self.node}", self._drop_tracker, action, *args)

    def _drop_tracker(self) -> None:
        tracker, self.tracker = self.tracker, None
        if tracker is not None:
            tracker.stop()  # its background threads

    # -------------------------------------------------------------------------------------- budget
    def _check_budget(self, trainer: TrainerView, emissions: float) -> None:
        budget = self.config.max_kg_co2eq
        if budget is None or emissions < budget:
            return
        trainer.request_stop(
            f"carbon budget reached: {emissions:.4g} kg CO2eq >= carbon.max_kg_co2eq={budget:g}; raise "
            "carbon.max_kg_co2eq (or set it to null) and run the same command to continue"
        )

    def _print_projection(self, trainer: TrainerView, total: CarbonTotals, projected: float, per_step: float) -> None:
        max_steps = self.max_steps
        line = (
            f"carbon: {total.energy_kwh:.4g} kWh, {total.emissions_kg_co2eq:.4g} kg CO2eq so far "
            f"({self._nodes_measured} node(s)); projected {projected:.4g} kg CO2eq for {max_steps} steps"
        )
        budget = self.config.max_kg_co2eq
        if budget is not None:
            line += f"; budget carbon.max_kg_co2eq={budget:g}"
            if projected > budget and per_step > 0:
                at = trainer.state.step + max(budget - total.emissions_kg_co2eq, 0.0) / per_step
                line += f" stops the run near step {math.ceil(at)}"
        print(line, flush=True)
