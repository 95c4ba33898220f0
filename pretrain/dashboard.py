"""`python -m pretrain.dashboard runs_dir=DIR [port=P]`: a live page of every run under DIR, for a whole project.

    python -m pretrain.dashboard runs_dir=runs                      # http://127.0.0.1:8765/, Ctrl-C stops it
    python -m pretrain.dashboard runs_dir=runs port=0               # any free port (printed)
    python -m pretrain.dashboard runs_dir=runs export=runs.html     # the same page, one self-contained file
    curl http://127.0.0.1:8765/api/summary                          # its figures as JSON

Every run under runs_dir (sweeps grouped by sweep) with its status (running, starting, stalled, preempted
and waiting to resume, stopped, finished, failed), step and ETA, loss and validation loss against tokens
with the runs overlaid, tokens/s, MFU where the run logs it, energy and kg CO2eq per node and per million
tokens, the projected total; and the project's totals of energy and CO2, failed and preempted runs included
(the sum of every run's CodeCarbon CSVs). No account, no network: the server binds 127.0.0.1 unless told
otherwise, serves its own assets, reads the run directories without writing or locking anything, and the page
polls for what changed. The code is in pretrain/monitor/.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hydra.core.config_store import ConfigStore

from common.app import run_app
from common.errors import ConfigProblems, UserError
from common.files import write_text_atomic

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class DashboardConfig:
    # The directory holding the run directories (searched max_depth levels deep), or one run directory.
    runs_dir: str = "runs"
    # Where the server listens; 127.0.0.1 keeps it on this machine (reach it from elsewhere with ssh -L).
    host: str = "127.0.0.1"
    # 0: any free port (the URL is printed).
    port: int = 8765
    # Seconds between the page's requests for new metrics.
    refresh_s: float = 2.0
    # A run writing nothing for this long (or for three of its own log intervals, if longer) is shown stalled.
    stall_after_s: float = 600.0
    # Folder levels searched for run directories under runs_dir.
    max_depth: int = 4
    # Write the page with its data, as one self-contained HTML file, to this path and exit (no server).
    export: str | None = None

    def problems(self) -> ConfigProblems:
        problems = ConfigProblems()
        problems.check(bool(self.runs_dir), "runs_dir", self.runs_dir, "must name a directory")
        problems.check(0 <= self.port < 65536, "port", self.port, "must be in [0, 65535] (0: a free port)")
        problems.check(self.refresh_s > 0, "refresh_s", self.refresh_s, "must be > 0")
        problems.check(self.stall_after_s > 0, "stall_after_s", self.stall_after_s, "must be > 0")
        problems.check(self.max_depth >= 1, "max_depth", self.max_depth, "must be >= 1")
        return problems


def run(config: DashboardConfig) -> int:
    config.problems().raise_if_any()
    runs_dir = Path(config.runs_dir)
    if not runs_dir.is_dir():
        raise UserError(
            f"runs_dir={config.runs_dir!r} is not a directory: pass the directory holding your runs (the parent of "
            "each run_dir of python -m pretrain)"
        )
    # Here, so that a config error does not pay for them.
    from pretrain.monitor.runs import Project
    from pretrain.monitor.server import Dashboard, serve

    dashboard = Dashboard(Project(runs_dir, config.stall_after_s, config.max_depth), config.refresh_s)
    if config.export:
        out = Path(config.export)
        if not out.parent.is_dir():
            raise UserError(f"export={config.export!r}: its directory does not exist")
        page = dashboard.snapshot()
        try:
            write_text_atomic(out, page)
        except OSError as error:
            raise UserError(f"export={config.export!r} cannot be written: {error.strerror}") from None
        print(f"wrote {out} ({len(dashboard.project.runs)} runs, {len(page.encode()) / 1e3:.0f} kB)", flush=True)
        return 0
    try:
        server = serve(dashboard, config.host, config.port)
    except OSError as error:
        raise UserError(
            f"cannot listen on {config.host}:{config.port}: {error.strerror}; pass port=0 for a free port"
        ) from None
    host, port = str(server.server_address[0]), int(server.server_address[1])
    dashboard.project.refresh(force=True)
    print(
        f"dashboard of {runs_dir.absolute()} ({len(dashboard.project.runs)} runs) at http://{host}:{port}/ "
        "(Ctrl-C stops it)",
        flush=True,
    )
    if config.host not in LOOPBACK:
        print(f"warning: listening on {config.host}: whoever reaches this machine can read these runs", flush=True)
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def main() -> None:
    ConfigStore.instance().store(name="dashboard_schema", node=DashboardConfig)
    run_app("dashboard", run)


if __name__ == "__main__":
    main()
