"""User-facing errors.

Everything a user can get wrong (model name, sparsity, data, trajectory) raises
:class:`GispError` with one line that says what to do; the CLI prints that line
instead of a traceback.
"""


class GispError(Exception):
    """A problem with the user's input, explained in one line."""
