"""What every command-line entry point of the project shares: user errors and the Hydra app wrapper."""

from cli.errors import ConfigProblems, UserError

__all__ = ["ConfigProblems", "UserError"]
