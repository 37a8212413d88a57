"""The error for bad input to a command: one line naming what is wrong and what to do, exit code 2.

``BadInput`` is a ``SystemExit`` (code 2), so a command stops wherever it is raised; the command
entry points (``famnet_pl.cli.main``, ``famnet-pl slurm``) print its message as one line,
``famnet-pl CMD: error: MESSAGE``, as they do for the data errors (sheets, frames, protocols).
"""

from __future__ import annotations


class BadInput(SystemExit):
    """Bad arguments, config or state for a command; ``str()`` is the message."""

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message
