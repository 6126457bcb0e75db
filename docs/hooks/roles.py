"""MkDocs hook: the docstrings use Sphinx roles (:func:`x`, :class:`x`, ...); Markdown renders them
as ``:func:<code>x</code>``. Drop the role and keep the code span."""

import re

_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|attr|data|exc|obj|const|term|ref):(<code>)~?")


def on_page_content(html, page, config, files):
    return _ROLE.sub(r"\1", html)
