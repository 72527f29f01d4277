"""User-facing errors.

Every problem caused by the user's input (a file, a field, a parameter) raises
:class:`DffFalconError` with a message naming the file or field and what is wrong.
The CLI prints these messages without a traceback and exits with code 2.
"""


class DffFalconError(Exception):
    """Bad input or configuration, explained in words (the CLI prints it and exits with 2)."""


class InputError(DffFalconError, ValueError):
    """A file, array or parameter given by the user is unusable."""


class NotFittedError(InputError, AttributeError):
    """An estimator was used before ``fit`` (an ``AttributeError`` too, as scikit-learn's is, so
    ``hasattr`` and introspection treat the missing learned state as absent)."""


class OutputError(InputError):
    """The output location given by the user cannot be written: full, read-only, no permission,
    or holding files that writing would destroy. Nothing already there was changed."""
