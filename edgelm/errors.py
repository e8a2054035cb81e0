"""The one exception edgelm raises for bad input; the CLI prints it as a single line."""


class EdgelmError(Exception):
    """Something about the input is wrong; the message says what, where, and how to fix it."""


def missing_dependency(module: str, extra: str) -> EdgelmError:
    """The error for an optional dependency that is not installed."""
    return EdgelmError(f"{module} is not installed; install it with: pip install 'edgelm[{extra}]'")
