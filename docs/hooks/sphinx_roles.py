"""MkDocs hook: show the docstrings' Sphinx roles as plain code on the API pages.

The docstrings in lxn_ray are written for reading in the source, with Sphinx roles such as
``:func:`name``` and ``:class:`~pkg.mod.Name```. mkdocstrings renders them as Markdown, which leaves
the role's prefix in front of the code span (``:func:<code>name</code>``). This hook drops the prefix
and, as Sphinx does, shows only the last part of a ``~``-prefixed path. It changes nothing else.
"""

from __future__ import annotations

import re

ROLES = "func|class|meth|mod|attr|data|exc|obj|const|ref|term"
ROLE = re.compile(rf":(?:py:)?(?:{ROLES}):<code>(~?)([^<]*)</code>")


def _plain(match: re.Match[str]) -> str:
    tilde, target = match.groups()
    return f"<code>{target.rsplit('.', 1)[-1] if tilde else target}</code>"


def on_page_content(html: str, **_: object) -> str:
    """Drop the role prefix in front of every code span of the page's HTML."""
    return ROLE.sub(_plain, html)
