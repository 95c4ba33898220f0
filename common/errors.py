"""User errors: problems the user can fix, printed as one clear line instead of a traceback.

A bug still raises any other exception and shows its traceback; only `UserError` is turned into a line.
"""

from __future__ import annotations

from typing import Any


class UserError(Exception):
    """A problem with the user's input, config or environment; its message names the thing and the fix."""


class ConfigProblems:
    """Collects every config problem, then raises them all at once (litgpt-style), each naming key and value.

    Usage::

        problems = ConfigProblems()
        problems.check(cfg.seq_len >= 1, "seq_len", cfg.seq_len, "must be >= 1")
        problems.raise_if_any()
    """

    def __init__(self) -> None:
        self.messages: list[str] = []

    def add(self, key: str, value: Any, why: str) -> None:
        self.messages.append(f"{key}={value!r}: {why}")

    def check(self, ok: bool, key: str, value: Any, why: str) -> None:
        if not ok:
            self.add(key, value, why)

    def extend(self, other: ConfigProblems) -> None:
        self.messages.extend(other.messages)

    def raise_if_any(self, what: str = "invalid config") -> None:
        if self.messages:
            raise UserError(f"{what}: " + "; ".join(self.messages))
