"""The dashboard's HTTP server: read-only, standard library only (http.server), bound to 127.0.0.1 by default.

    GET /                     the page
    GET /static/<name>        its script, style and uPlot (package data)
    GET /api/summary          every run and the project's totals, as JSON
    GET /api/updates?cursor=  the summary, plus for each run the metrics entries after the page's cursor
                              (`<run id>:<generation>:<count>,...`): a poll costs what the runs wrote since

Every other path is 404, every other method 501: the server changes nothing. Requests are served on threads;
one lock keeps refreshes of the shared Project in turn (a refresh reads only what changed).
"""

from __future__ import annotations

import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from pretrain.monitor.page import ASSETS, asset, content_type, render_page, to_json
from pretrain.monitor.runs import Project


def parse_cursor(text: str) -> dict[str, tuple[int, int]]:
    """`id:generation:count,...` -> {id: (generation, count)}; malformed parts are ignored (sent again whole)."""
    cursors = {}
    for part in text.split(","):
        pieces = part.split(":")
        if len(pieces) == 3 and pieces[1].lstrip("-").isdigit() and pieces[2].isdigit():
            cursors[pieces[0]] = (int(pieces[1]), int(pieces[2]))
    return cursors


class Dashboard:
    """What the handlers share: the project, its lock, and the page's settings."""

    def __init__(self, project: Project, refresh_s: float) -> None:
        self.project = project
        self.refresh_s = refresh_s
        self.lock = threading.Lock()

    def summary(self) -> dict[str, Any]:
        with self.lock:
            self.project.refresh()
            return self.project.summary()

    def updates(self, cursors: dict[str, tuple[int, int]]) -> dict[str, Any]:
        with self.lock:
            self.project.refresh()
            return {"summary": self.project.summary(), "series": self.project.series(cursors)}

    def page(self) -> str:
        return render_page(str(self.project.runs_dir), {"mode": "live", "refresh_s": self.refresh_s}, inline=False)

    def snapshot(self) -> str:
        """The page as one file, with the data of this moment."""
        data = self.updates({})
        return render_page(str(self.project.runs_dir), {"mode": "static", "refresh_s": 0, "data": data}, inline=True)


def make_handler(dashboard: Dashboard) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "pretrain-dashboard"

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            if url.path in ("/", "/index.html"):
                self._send(dashboard.page().encode(), "text/html; charset=utf-8")
            elif url.path.startswith("/static/") and url.path.removeprefix("/static/") in ASSETS:
                name = url.path.removeprefix("/static/")
                self._send(asset(name), content_type(name))
            elif url.path == "/api/summary":
                self._send(to_json(dashboard.summary()).encode(), "application/json")
            elif url.path == "/api/updates":
                cursor = parse_qs(url.query).get("cursor", [""])[0]
                self._send(to_json(dashboard.updates(parse_cursor(cursor))).encode(), "application/json")
            else:
                self.send_error(HTTPStatus.NOT_FOUND, "not found: the dashboard serves /, /api/summary, /api/updates")

        def _send(self, body: bytes, kind: str) -> None:
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # a poll every few seconds would flood the terminal

    return Handler


def serve(dashboard: Dashboard, host: str, port: int) -> ThreadingHTTPServer:
    """A server bound to host:port (0: a free port), not yet serving: call serve_forever()."""
    server = ThreadingHTTPServer((host, port), make_handler(dashboard))
    server.daemon_threads = True
    return server
