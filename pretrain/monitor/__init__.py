"""Monitoring a project's runs: `python -m pretrain.dashboard` (pretrain/dashboard.py) is the command.

runs.py follows the run directories incrementally, status.py says how each run stands, server.py serves the
page and its JSON, page.py renders the page (live, or one self-contained file), static/ holds its assets.
"""
