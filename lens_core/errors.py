"""Errors that carry a message a user can act on (which file, what was expected, how to fix it)."""


class LensError(Exception):
    """Base class of every error lens_core raises on purpose."""


class LensFileError(LensError):
    """A model file is missing, broken, or is not the kind of file that was asked for."""


class LensInputError(LensError, ValueError):
    """An argument (size, steps, tensor shape...) cannot be used; raised before any heavy work."""


def some(names, shown: int = 5) -> str:
    """A few names and a count of the rest, so a message stays short however many names a file produces."""
    names = list(names)
    listed = ", ".join(name if len(name) <= 80 else name[:77] + "..." for name in map(str, names[:shown]))
    return listed + (f" and {len(names) - shown} more" if len(names) > shown else "")
