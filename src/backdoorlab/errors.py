"""The one exception type a user can cause (house rule 9).

Every error that follows from user input (an unknown name, a value out of range, a missing or
corrupt file, a malformed study) is raised as :class:`BackdoorLabError` with a one-line message.
The CLI prints that line and exits with status 2, without a traceback.
"""

from __future__ import annotations


class BackdoorLabError(Exception):
    """A user-caused error with a one-line, actionable message."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def check(condition: bool, message: str) -> None:
    """Raise :class:`BackdoorLabError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise BackdoorLabError(message)
