"""User-facing errors.

Anything a user can get wrong (a recipe, a path, a checkpoint) raises
:class:`UserError`. The CLI prints its message on one line and exits with
code 2; it never shows a traceback for these.
"""

import reprlib

#: Shows a bad value briefly, however large or deeply nested (a YAML alias bomb included).
_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxstring, _SHORT.maxother = 2, 6, 4, 60, 60


class UserError(Exception):
    """A mistake in the user's input: bad recipe, missing data, incompatible checkpoint."""


def short_repr(value) -> str:
    """``repr(value)`` cut to at most 80 characters, cheap however large or deeply nested ``value`` is."""
    shown = _SHORT.repr(value)
    return shown if len(shown) <= 80 else shown[:76] + " ..."


def option_path(parts) -> str:
    """``("stages", 2, "lr")`` -> ``"stages[2].lr"`` (pydantic's ``[key]`` marks a bad mapping key)."""
    text = ""
    for part in parts:
        if part == "[key]":
            text += " (a key)"
        else:
            text += f"[{part}]" if isinstance(part, int) else f"{'.' if text else ''}{part}"
    return text


def format_validation_error(exc, where: str, prefix: str = "") -> str:
    """One line naming the first offending option of a pydantic ``ValidationError``.

    ``where`` starts the line, ``prefix`` goes before the option's own path, e.g.
    ``recipe x.yaml: model.options.dropout: Input should be less than 1 (got 1.5)``.
    """
    err = exc.errors()[0]
    loc = option_path(([prefix] if prefix else []) + list(err["loc"]))
    msg = " ".join(err["msg"].replace("Value error, ", "").splitlines())
    if err["type"] == "extra_forbidden":
        msg = "unknown option"
    if not err["loc"]:  # a rule between options (its message names them) or a whole section
        return f"{where}: {loc + ': ' if loc else ''}{msg}"
    got = ""
    if err["type"] != "extra_forbidden" and "input" in err and not isinstance(err["input"], dict):
        got = f" (got {short_repr(err['input'])})"
    return f"{where}: {loc}: {msg}{got}"
