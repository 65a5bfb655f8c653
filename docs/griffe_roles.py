"""A griffe extension (mkdocs.yml, mkdocstrings ``extensions``): the source's docstrings use reStructuredText roles
(``:class:`Denoiser```, ``:func:`~torchdiffusion.runs.latent.to_images```), which Markdown would show verbatim;
this turns each into inline code of the name (the last dotted part when the target starts with ``~``)."""

from __future__ import annotations

import re

import griffe

ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|obj|exc|py:\w+):`(~?)([^`]+)`")


def plain(text: str) -> str:
    """``text`` with every role replaced by ``\\`name\\```."""
    return ROLE.sub(lambda m: f"`{m.group(2).rsplit('.', 1)[-1] if m.group(1) else m.group(2)}`", text)


class RstRoles(griffe.Extension):
    """Rewrite roles in every docstring as it is loaded."""

    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = plain(obj.docstring.value)
