"""A griffe extension for the API reference: Sphinx roles in docstrings read as code.

The package's docstrings name other objects the Sphinx way (``:class:`~cachedfeatures.Entry```,
``:func:`prefill```), which mkdocstrings would print verbatim. This rewrites each role to inline
code at load time (``Entry``, ``prefill``): the docstrings stay readable in ``help()`` and in the
site. Loaded by ``mkdocs.yml`` (``extensions: [docs/griffe_roles.py]``).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|mod|data|exc|obj):`(~?)([^`]+)`")


def plain(text: str) -> str:
    """``:class:`~a.b.C``` -> ```C```; ``:func:`a.b.f``` -> ```a.b.f```."""

    def code(match: re.Match[str]) -> str:
        short, target = match.groups()
        return f"`{target.rsplit('.', 1)[-1] if short else target}`"

    return ROLE.sub(code, text)


class SphinxRoles(griffe.Extension):
    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = plain(obj.docstring.value)
