"""The documentation (issue 32): every public name has a docstring that renders, the CLI reference is generated from
the parser, and the site builds with ``mkdocs build --strict`` and shows the Pipeline's documented signature in a
real browser (Playwright driving the system Chromium, as tests/test_studio.py does).

The site is built without executing the tutorials (``TD_DOCS_EXECUTE=false``; tests/test_tutorials.py runs them),
so this costs seconds. Tests that need the ``docs`` extra skip with the reason when it is not installed.
"""

from __future__ import annotations

import functools
import http.server
import importlib.util
import inspect
import logging
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import torchdiffusion as td
from helpers import launch_chromium
from torchdiffusion.cli.commands import COMMANDS
from torchdiffusion.cli.main import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS_EXTRA = "the docs extra is not installed (pip install -e '.[docs]'; `make docs` does it)"


@pytest.fixture(scope="module")
def package():
    """The package as griffe (what mkdocstrings renders from) loads it from the source, aliases resolved."""
    griffe = pytest.importorskip("griffe", reason=DOCS_EXTRA)
    return griffe.load("torchdiffusion", search_paths=[str(ROOT / "src")], resolve_aliases=True,
                       resolve_external=False)


def _hooks():
    """docs/hooks.py (the mkdocs hooks that generate the CLI and results pages) as a module."""
    pytest.importorskip("mkdocs", reason=DOCS_EXTRA)
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def defining_path(name: str) -> str:
    """Where ``torchdiffusion.NAME`` is defined (``td`` loads its names lazily, so static tools such as griffe see
    them at their home): a module's name, a class's or function's module and qualified name, or for a constant
    the module that assigns it."""
    obj = getattr(td, name)
    if inspect.ismodule(obj):
        return obj.__name__
    if hasattr(obj, "__qualname__") and hasattr(obj, "__module__"):
        return f"{obj.__module__}.{obj.__qualname__}"
    homes = [m for m, mod in sys.modules.items() if m.startswith("torchdiffusion.") and getattr(mod, "__file__", None)
             and f"\n{name} = " in "\n" + Path(mod.__file__).read_text(encoding="utf-8")
             and getattr(mod, name, None) is obj]
    assert len(homes) == 1, (name, homes)
    return f"{homes[0]}.{name}"


def test_public_names_are_enumerated():
    """``__all__`` is exactly the public names the package exports (so the tests below see all of them)."""
    public = {n for n in dir(td) if not n.startswith("_")}
    assert set(td.__all__) <= public
    assert {"Pipeline", "Denoiser", "DDPM", "sample", "grids", "samplers", "PREDICTIONS"} <= set(td.__all__)


@pytest.mark.parametrize("name", sorted(td.__all__))
def test_every_public_name_has_a_docstring_that_renders(name, package, caplog):
    """griffe finds a docstring of at least a sentence for ``torchdiffusion.NAME``, which parses as a Google-style
    docstring (the site's style) without a warning."""
    obj = package[defining_path(name).removeprefix("torchdiffusion.")]
    obj = obj.final_target if getattr(obj, "is_alias", False) else obj
    assert obj.docstring is not None, f"torchdiffusion.{name} ({obj.path}) has no docstring"
    text = obj.docstring.value.strip()
    assert len(text) >= 20 and " " in text, f"torchdiffusion.{name}: docstring too short: {text!r}"
    with caplog.at_level(logging.WARNING, logger="griffe"):
        sections = obj.docstring.parse("google")
    assert sections and any(s.kind.value == "text" for s in sections), f"torchdiffusion.{name}: no text rendered"
    assert not [r for r in caplog.records if r.name.startswith("griffe")], caplog.text


def test_cli_reference_is_generated_from_the_parser():
    """docs/hooks.py writes every command's ``--help``, exactly as argparse prints it at the page's width."""
    hooks = _hooks()
    page = hooks.cli_markdown()
    parser = build_parser()
    assert hooks._help(parser) in page
    subs = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    assert set(subs.choices) == set(COMMANDS)
    for name, sub in subs.choices.items():
        assert f"## `{name}`" in page
        assert hooks._help(sub) in page, name
        assert f"usage: torchdiffusion {name}" in page


def test_results_pages_cover_every_results_file():
    hooks = _hooks()
    pages = hooks.results_pages()
    files = sorted(p.name for p in (ROOT / "benchmarks" / "results").glob("*.md"))
    assert sorted(k.split("/", 1)[1] for k in pages if k != "results/index.md") == files
    for name in files:
        assert f"]({name})" in pages["results/index.md"]
        assert "../../docs/images/" not in pages[f"results/{name}"]  # rewritten to the site's images/


@pytest.fixture(scope="module")
def served(site):
    """The built site over HTTP on a loopback port (Material's search worker does not load from file://)."""
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """``mkdocs build --strict`` of this checkout into a temporary folder, tutorials not executed."""
    pytest.importorskip("mkdocs", reason=DOCS_EXTRA)
    pytest.importorskip("mkdocstrings", reason=DOCS_EXTRA)
    pytest.importorskip("mkdocs_jupyter", reason=DOCS_EXTRA)
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "TD_DOCS_EXECUTE": "false", "NO_MKDOCS_2_WARNING": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                          "-d", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "WARNING" not in res.stderr, res.stderr[-3000:]
    return out


def _text(html: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html)).replace("&quot;", '"').replace("&amp;", "&")


def test_built_api_pages_render_every_public_name(site, package):
    """Each name of ``__all__`` is a heading (an anchor ``torchdiffusion.NAME`` or its module's path) with its
    docstring's first words on the built API pages."""
    api = "\n".join(p.read_text(encoding="utf-8") for p in sorted((site / "api").glob("*.html")))
    text = _text(api)
    for name in td.__all__:
        path = defining_path(name)
        target = package[path.removeprefix("torchdiffusion.")]
        assert f'id="{path}"' in api, f"no heading for torchdiffusion.{name} ({path})"
        first = " ".join(re.sub(r"[`*]", "", target.docstring.value).split()[:4])
        first = re.sub(r":\w+:", "", first)
        assert first.split()[0] in text, (name, first)


def test_browser_finds_the_pipeline_signature(served):
    """Chromium opens the built index and the Pipeline API page (served over HTTP) and reads ``Pipeline.__call__``'s
    documented signature (its arguments and defaults, as design section 5 states them)."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install -e '.[dev]'")
    with sync_api.sync_playwright() as p:
        browser = launch_chromium(p, sync_api)
        try:
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{served}/index.html")
            assert "torchdiffusion" in page.title()
            assert page.get_by_role("heading", name="torchdiffusion", exact=False).first.is_visible()
            page.goto(f"{served}/api/pipeline.html")
            assert page.locator('[id="torchdiffusion.runs.pipeline.Pipeline.__call__"]').count() == 1
            sig = " ".join(" ".join(page.locator(".doc-signature").all_inner_texts()).split())
            call = sig[sig.index("__call__("):]
            call = call[: call.index(")", call.index("**") if "**" in call else 0) + 1]
            params = [p for p in inspect.signature(td.Pipeline.__call__).parameters.values() if p.name != "self"]
            assert {"n", "sampler", "steps", "grid", "class_labels", "guidance", "generator", "batch_size"} <= {
                p.name for p in params}  # design section 5
            for p in params:
                shown = f"**{p.name}" if p.kind == p.VAR_KEYWORD else f"{p.name}:"
                assert shown in call, (p.name, call)
                if p.default is None or isinstance(p.default, (bool, int, float)):  # the default as written
                    assert re.search(rf"\b{p.name}: [^=]*= {re.escape(repr(p.default))}[,)]", call), (p.name, call)
            assert "from_pretrained(" in sig and "ema: bool = True" in sig
            first = " ".join(re.sub(r"[`*]", "", inspect.getdoc(td.Pipeline.__call__)).split()[:5])
            assert first in " ".join(page.inner_text("body").split()), first  # its docstring, rendered
            assert not errors, errors
        finally:
            browser.close()
