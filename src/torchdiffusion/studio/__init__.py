"""L5.5 studio: a local web page to explore a trained run (``torchdiffusion studio RUN``, docs/design.md section 7).

:class:`Studio` holds a loaded :class:`torchdiffusion.Pipeline` and answers the page; :func:`make_server` binds
an HTTP server (standard library, loopback by default) that serves ``page.html`` (plain HTML and JS).
"""

from torchdiffusion.studio.app import Studio, StudioError
from torchdiffusion.studio.server import StudioServer, is_loopback, make_server

__all__ = ["Studio", "StudioError", "StudioServer", "is_loopback", "make_server"]
