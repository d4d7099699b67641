"""Griffe extension for the API reference: Sphinx cross-reference roles read as code.

The package's docstrings are reStructuredText-flavoured (``:func:`name```, ``:mod:`name```,
double backticks). MkDocs renders Markdown, where a role would show as literal text; this
extension rewrites each role to a plain code span and double backticks to single ones, so
the rendered page reads like the docstring does in an editor.
"""

from __future__ import annotations

import re

import griffe

ROLE = re.compile(r":(?:py:)?(?:func|meth|class|mod|attr|data|obj|exc|const):`~?([^`]+)`")
DOUBLE_BACKTICKS = re.compile(r"``([^`]+)``")


class PlainRoles(griffe.Extension):
    """Rewrite roles and double backticks in every docstring as it is loaded."""

    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            text = DOUBLE_BACKTICKS.sub(r"`\1`", obj.docstring.value)
            obj.docstring.value = ROLE.sub(r"`\1`", text)
