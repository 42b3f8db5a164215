"""The one exception type of facedoor-export: a message fit for one line on stderr."""


class ExportError(RuntimeError):
    """An export step failed for a reason the user can act on (missing weights, bad hash, ...)."""
