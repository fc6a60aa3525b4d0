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


def require_extra(module: str, extra: str, who: str):
    """Import and return optional dependency ``module``; if it is missing, raise one
    :class:`BackdoorLabError` line naming the extra that provides it, e.g.
    ``int8-openvino needs openvino: pip install 'backdoorlab[openvino]'``.

    Only a missing module becomes the user error; an import that fails inside the package (a
    broken install) keeps its traceback.
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is None or not (module == exc.name or module.startswith(exc.name + ".")):
            raise
        raise BackdoorLabError(f"{who} needs {module.split('.')[0]}, which is not installed: "
                               f"pip install 'backdoorlab[{extra}]'") from None
