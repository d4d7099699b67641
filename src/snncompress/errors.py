"""User-facing errors.

Anything a user can get wrong (a recipe, a path, a checkpoint) raises
:class:`UserError`. The CLI prints its message on one line and exits with
code 2; it never shows a traceback for these.
"""


class UserError(Exception):
    """A mistake in the user's input: bad recipe, missing data, incompatible checkpoint."""
