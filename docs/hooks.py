"""MkDocs hooks (mkdocs.yml ``hooks:``): pages generated at build time, never copied by hand.

- ``cli.md``: every command's ``--help``, from the argparse parser that ``torchdiffusion`` itself runs
  (``torchdiffusion.cli.main.build_parser``), so the reference cannot drift from the code.
- ``results/*.md``: the benchmark results files (``benchmarks/results/*.md``, written by ``benchmarks/*.py``)
  with their pictures, and an index of them.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _help(parser: argparse.ArgumentParser) -> str:
    """``parser.format_help()`` at a fixed width (independent of the terminal the build runs in)."""
    parser.formatter_class = lambda prog: argparse.HelpFormatter(prog, width=100, max_help_position=32)
    return parser.format_help().rstrip()


def cli_markdown() -> str:
    """The command-line reference: ``torchdiffusion --help`` and every subcommand's ``--help``."""
    from torchdiffusion.cli.main import build_parser

    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    lines = ["# Command line", "",
             "Generated at build time from the parser that `torchdiffusion` runs (`torchdiffusion.cli.main`"
             ".build_parser`), so it is exactly what `torchdiffusion COMMAND --help` prints. Errors are one line "
             "(`torchdiffusion: error: ...`, exit status 2) without a traceback.", "",
             "```text", "$ torchdiffusion --help", _help(parser), "```", ""]
    for name, sub in subs.choices.items():
        lines += [f"## `{name}`", "", "```text", f"$ torchdiffusion {name} --help", _help(sub), "```", ""]
    return "\n".join(lines)


def _title(text: str, fallback: str) -> str:
    m = re.search(r"^#\s+(.+)$", text, flags=re.M)
    return m.group(1).strip() if m else fallback


def results_pages() -> dict[str, str]:
    """``results/NAME.md`` for every ``benchmarks/results/NAME.md`` (links to the repository's pictures
    rewritten to the site's), plus ``results/index.md``."""
    pages, rows = {}, []
    for md in sorted(RESULTS.glob("*.md")):
        text = md.read_text(encoding="utf-8").replace("../../docs/images/", "../images/")
        pages[f"results/{md.name}"] = text
        script = ROOT / "benchmarks" / f"{md.stem}.py"
        made_by = f"`benchmarks/{script.name}`" if script.is_file() else "a benchmark script"
        rows.append(f"| [{_title(text, md.stem)}]({md.name}) | {made_by} |")
    pages["results/index.md"] = "\n".join([
        "# Benchmark results", "",
        "Each page is a file of `benchmarks/results/`, written by one command (`python benchmarks/NAME.py`) "
        "with the machine, versions and date it ran on. Benchmarks are not tests: they measure, and the README "
        "quotes them (`tests/test_readme_figures.py` checks the README's numbers against these files).", "",
        "| results | written by |", "|---|---|", *rows, ""])
    return pages


def on_config(config):
    """Every results page joins the nav under "Benchmark results" (after its index), in file order."""
    for i, entry in enumerate(config["nav"] or []):
        if isinstance(entry, dict) and entry.get("Benchmark results") == "results/index.md":
            pages = [f"results/{md.name}" for md in sorted(RESULTS.glob("*.md"))]
            config["nav"][i] = {"Benchmark results": ["results/index.md", *pages]}
    return config


def on_files(files, config):
    files.append(File.generated(config, "cli.md", content=cli_markdown()))
    for uri, text in results_pages().items():
        files.append(File.generated(config, uri, content=text))
    for png in sorted(RESULTS.glob("*.png")):
        files.append(File.generated(config, f"results/{png.name}", abs_src_path=str(png)))
    return files
