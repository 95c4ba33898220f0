"""The dashboard page: served live (assets fetched from the server) or exported as one self-contained HTML file
(uPlot, the page's script and style and the data all inlined: it opens anywhere, offline, and never changes).

The assets are package data (pretrain/monitor/static/): uPlot 1.6.32 (MIT, its license beside it) is vendored as
its built, minified file, so nothing is fetched from a CDN and nothing is built at install time.
"""

from __future__ import annotations

import html
import json
import math
from importlib import resources
from typing import Any

ASSETS = {
    "uPlot.iife.min.js": "vendor/uPlot.iife.min.js",
    "uPlot.min.css": "vendor/uPlot.min.css",
    "uPlot.LICENSE": "vendor/uPlot.LICENSE",
    "dashboard.js": "dashboard.js",
    "dashboard.css": "dashboard.css",
}
STYLES = ("uPlot.min.css", "dashboard.css")
SCRIPTS = ("uPlot.iife.min.js", "dashboard.js")
CONTENT_TYPES = {".js": "text/javascript", ".css": "text/css", ".html": "text/html", ".LICENSE": "text/plain"}


def asset(name: str) -> bytes:
    """A static file of the page by its public name (KeyError for any other name: no path ever reaches disk)."""
    return resources.files("pretrain.monitor").joinpath("static", ASSETS[name]).read_bytes()


def content_type(name: str) -> str:
    return CONTENT_TYPES.get("." + name.rsplit(".", 1)[-1], "application/octet-stream") + "; charset=utf-8"


def json_safe(value: Any) -> Any:
    """`value` with every NaN or infinity as None: JSON has no NaN, and the browser's JSON.parse refuses it."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def to_json(value: Any) -> str:
    return json.dumps(json_safe(value), allow_nan=False, separators=(",", ":"))


def _script_json(value: Any) -> str:
    # Inside <script>, "</" would end the element early (a run named "</script>" must stay a name).
    return to_json(value).replace("</", "<\\/")


def render_page(title: str, config: dict[str, Any], inline: bool) -> str:
    """The page; `config` becomes window.DASHBOARD (mode, refresh_s, and for a static page its data)."""
    template = resources.files("pretrain.monitor").joinpath("static", "index.html").read_text(encoding="utf-8")
    if inline:
        styles = "\n".join(f"<style>\n{asset(name).decode()}\n</style>" for name in STYLES)
        # A script's text must not hold "</script" (it would end the element); "<\/" means the same in JS.
        bodies = [asset(name).decode().replace("</script", "<\\/script") for name in SCRIPTS]
        scripts = "\n".join(f"<script>\n{body}\n</script>" for body in bodies)
    else:
        styles = "\n".join(f'<link rel="stylesheet" href="static/{name}">' for name in STYLES)
        scripts = "\n".join(f'<script src="static/{name}"></script>' for name in SCRIPTS)
    return (
        template.replace("<!--STYLES-->", styles)
        .replace("<!--SCRIPTS-->", scripts)
        .replace("__TITLE__", html.escape(title))
        .replace("__CONFIG__", _script_json(config))
    )
