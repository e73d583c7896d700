"""The errors of the modelling room that a user can fix, in a module without torch, so a command line can name
them (and ``--help`` can run) before any model library is imported."""


class ModelError(ValueError):
    """The --model value does not name a usable encoder."""
