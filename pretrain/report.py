"""`python -m pretrain.report RUN`: one self-contained HTML page of a run, for people with no W&B account or
no network.

Reads RUN/metrics.jsonl (and RUN/config.yaml, RUN/status.json when present) and writes RUN/report/index.html
plus its charts as PNG files next to it: loss and validation loss, learning rate, tokens/s, power and
cumulative emissions, all against tokens seen; for a data mixture, the tokens and the validation loss of each
source, with the mixture's changes marked. The page embeds the PNGs (base64), so it can be mailed or
opened anywhere on its own.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.app import EXIT_USER_ERROR, report_user_error
from common.errors import UserError
from pretrain.core.callbacks.metrics_file import read_metrics
from pretrain.core.run_dir import RunDir


@dataclass
class Chart:
    name: str  # the PNG's file name, without .png
    title: str
    png: bytes


def _series(entries: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(tokens, values) of the entries holding a finite `key`."""
    points = [
        (e["tokens"], e[key])
        for e in entries
        if isinstance(e.get(key), (int, float)) and math.isfinite(e[key]) and "tokens" in e
    ]
    return [p[0] for p in points], [p[1] for p in points]


def _figure(draw: Callable[[Any], None], ylabel: str) -> bytes:
    # The object-oriented API with no pyplot: no global figure state and no GUI backend to pick.
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.4, 3.3), dpi=100, layout="constrained")
    axes = figure.subplots()
    draw(axes)
    axes.set_xlabel("tokens")
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
        axes.legend()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _plot_from_zero(axes: Any, tokens: list[float], watts: list[float]) -> None:
    # From 0 W: an autoscaled axis would blow up a 1% wobble into a cliff.
    axes.plot(tokens, watts, color="tab:red")
    axes.set_ylim(0, max(watts, default=1.0) * 1.15)


def _sources(entries: list[dict[str, Any]], prefix: str) -> list[str]:
    """The source names of a data mixture's per-source keys (`<prefix>/<source>`), in first-seen order."""
    return list(dict.fromkeys(k.split("/", 1)[1] for e in entries for k in e if k.startswith(prefix + "/")))


def _mark_changes(axes: Any, mixtures: list[dict[str, Any]]) -> None:
    for change in mixtures:
        if change.get("step", 0) > 0:
            axes.axvline(change["tokens"], linestyle=":", color="gray", label=f"new mixture (step {change['step']})")


def _mixture_charts(
    train: list[dict[str, Any]], evals: list[dict[str, Any]], mixtures: list[dict[str, Any]]
) -> list[Chart]:
    charts = []
    sources = _sources(train, "tokens")
    if sources:

        def tokens(axes: Any) -> None:
            for name in sources:
                axes.plot(*_series(train, f"tokens/{name}"), label=name)
            _mark_changes(axes, mixtures)

        charts.append(Chart("tokens_by_source", "Tokens per source", _figure(tokens, "tokens of the source")))
    val_sources = _sources(evals, "val_loss")
    if val_sources:

        def val_loss(axes: Any) -> None:
            for name in val_sources:
                axes.plot(*_series(evals, f"val_loss/{name}"), "o-", label=name)
            axes.plot(*_series(evals, "val_loss"), "k--", label="all sources")
            _mark_changes(axes, mixtures)

        charts.append(
            Chart("val_loss_by_source", "Validation loss per source", _figure(val_loss, "cross-entropy (nats)"))
        )
    return charts


def make_charts(
    train: list[dict[str, Any]],
    evals: list[dict[str, Any]],
    budget: float | None,
    mixtures: list[dict[str, Any]] | None = None,
) -> list[Chart]:
    charts = []

    def loss(axes: Any) -> None:
        axes.plot(*_series(train, "loss"), label="train loss", color="tab:blue")
        tokens, values = _series(evals, "val_loss")
        if tokens:
            axes.plot(tokens, values, "o-", label="val loss", color="tab:orange")

    charts.append(Chart("loss", "Loss", _figure(loss, "cross-entropy (nats)")))
    charts.append(
        Chart("lr", "Learning rate", _figure(lambda a: a.plot(*_series(train, "lr"), color="tab:green"), "lr"))
    )
    charts.append(
        Chart(
            "throughput",
            "Throughput",
            _figure(lambda a: a.plot(*_series(train, "tokens_per_second"), color="tab:purple"), "tokens/s"),
        )
    )
    if _series(train, "emissions_kg_co2eq")[0]:
        charts.append(Chart("power", "Power", _figure(lambda a: _plot_from_zero(a, *_series(train, "power_w")), "W")))

        def emissions(axes: Any) -> None:
            axes.plot(*_series(train, "emissions_kg_co2eq"), label="emissions", color="tab:brown")
            if budget is not None:
                axes.axhline(budget, linestyle="--", color="black", label=f"budget {budget:g} kg")

        charts.append(Chart("emissions", "Cumulative emissions", _figure(emissions, "kg CO2eq")))
    return charts + _mixture_charts(train, evals, mixtures or [])


def _mixture_summary(
    train: list[dict[str, Any]], evals: list[dict[str, Any]], mixtures: list[dict[str, Any]]
) -> list[tuple[str, str]]:
    """Each source's tokens (share of all) and latest validation loss; the mixture's weights, from each step."""
    rows = []
    last = train[-1] if train else {}
    total = last.get("tokens") or 0
    latest_eval = evals[-1] if evals else {}
    for name in _sources(train, "tokens"):
        tokens = last.get(f"tokens/{name}", 0)
        text = f"{tokens:,} tokens ({tokens / total:.1%})" if total else f"{tokens:,} tokens"
        if f"val_loss/{name}" in latest_eval:
            text += f", val loss {latest_eval[f'val_loss/{name}']:.4f} (step {latest_eval['step']})"
        rows.append((f"source {name}", text))
    for change in mixtures:
        weights = ", ".join(f"{k.split('/', 1)[1]} {v:.4g}" for k, v in change.items() if k.startswith("data_weight/"))
        rows.append((f"data mixture from step {change['step']:,}", weights))
    return rows


def _summary(train: list[dict[str, Any]], evals: list[dict[str, Any]], status: dict[str, Any]) -> list[tuple[str, str]]:
    last = train[-1] if train else {}
    rows = [
        ("status", f"{status.get('state', 'unknown')}" + (f": {status['reason']}" if status.get("reason") else "")),
        ("step", f"{last.get('step', 0):,}" + (f" of {status['max_steps']:,}" if "max_steps" in status else "")),
        ("tokens", f"{last.get('tokens', 0):,}"),
    ]
    if "loss" in last:
        rows.append(("last train loss", f"{last['loss']:.4f}"))
    if evals:
        best = min(evals, key=lambda e: e.get("val_loss", math.inf))
        rows.append(
            ("best val loss", f"{best['val_loss']:.4f} (perplexity {best['val_perplexity']:.2f}, step {best['step']})")
        )
    speeds = [e["tokens_per_second"] for e in train if "tokens_per_second" in e]
    if speeds:
        rows.append(("median tokens/s", f"{sorted(speeds)[len(speeds) // 2]:,.0f}"))
    if "energy_kwh" in last:
        rows += [
            ("energy", f"{last['energy_kwh']:.4g} kWh"),
            ("emissions", f"{last['emissions_kg_co2eq']:.4g} kg CO2eq"),
            ("per million tokens", f"{last['kg_co2eq_per_million_tokens']:.4g} kg CO2eq"),
            ("projected for the planned run", f"{last['projected_kg_co2eq']:.4g} kg CO2eq"),
        ]
    return rows


def render_html(run_dir: Path, charts: list[Chart], summary: list[tuple[str, str]], config_text: str) -> str:
    name = html.escape(run_dir.resolve().name)
    table = "\n".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in summary)
    figures = "\n".join(
        f"<figure><figcaption>{html.escape(c.title)}</figcaption>"
        f'<img alt="{html.escape(c.title)}" src="data:image/png;base64,{base64.b64encode(c.png).decode()}"></figure>'
        for c in charts
    )
    config = (
        f"<details><summary>Resolved config</summary><pre>{html.escape(config_text)}</pre></details>"
        if config_text
        else ""
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Run {name}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 1.5em; }}
th, td {{ text-align: left; padding: 0.25em 1em 0.25em 0; border-bottom: 1px solid #ddd; }}
.charts {{ display: flex; flex-wrap: wrap; gap: 1em; }}
figure {{ margin: 0; }}
figcaption {{ font-weight: bold; margin-bottom: 0.3em; }}
img {{ max-width: 100%; border: 1px solid #eee; }}
</style></head>
<body>
<h1>Run {name}</h1>
<p>{html.escape(str(run_dir.resolve()))}</p>
<table>
{table}
</table>
<div class="charts">
{figures}
</div>
{config}
</body></html>
"""


def write_report(run_dir: Path, out_dir: Path | None = None) -> Path:
    """Write OUT/index.html and OUT/<chart>.png (OUT defaults to RUN/report); returns the HTML's path."""
    if not run_dir.is_dir():
        raise UserError(f"run directory {str(run_dir)!r} does not exist: pass the run_dir of a training run")
    run = RunDir(run_dir)
    entries = read_metrics(run.metrics)
    train = [e for e in entries if e.get("kind") == "train"]
    evals = [e for e in entries if e.get("kind") == "eval"]
    mixtures = [e for e in entries if e.get("kind") == "mixture"]
    if not train:
        raise UserError(
            f"{str(run_dir)!r} has no logged training step in metrics.jsonl: is it a run_dir of python -m pretrain, "
            "and has it reached its first train.log_interval?"
        )
    try:
        import matplotlib  # noqa: F401
    except ImportError as error:
        raise UserError("python -m pretrain.report needs matplotlib: pip install matplotlib") from error
    config_text = run.config_file.read_text(encoding="utf-8") if run.config_file.is_file() else ""
    status = run.read_status() or {}
    charts = make_charts(train, evals, _budget(config_text), mixtures)
    out = out_dir or run.report
    out.mkdir(parents=True, exist_ok=True)
    for chart in charts:
        (out / f"{chart.name}.png").write_bytes(chart.png)
    page = out / "index.html"
    summary = _summary(train, evals, status) + _mixture_summary(train, evals, mixtures)
    page.write_text(render_html(run_dir, charts, summary, config_text), encoding="utf-8")
    return page


def _budget(config_text: str) -> float | None:
    if not config_text:
        return None
    from omegaconf import OmegaConf

    value = OmegaConf.select(OmegaConf.create(config_text), "carbon.max_kg_co2eq")
    return float(value) if value is not None else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.report", description=__doc__)
    parser.add_argument("run_dir", type=Path, help="a run directory of python -m pretrain (holds metrics.jsonl)")
    parser.add_argument("--out", type=Path, default=None, help="where to write index.html and the PNGs (RUN/report)")
    args = parser.parse_args(argv)
    try:
        page = write_report(args.run_dir, args.out)
    except UserError as error:
        report_user_error(error)
        return EXIT_USER_ERROR
    print(f"wrote {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
