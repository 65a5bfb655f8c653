"""How a benchmark writes its results: the header lines (command, date, machine, versions) and the one writer,
:func:`write_results`, which writes ``benchmarks/results/NAME.md`` and its machine-readable twin ``NAME.json``.

The JSON is :func:`parse_results` of the Markdown, so the two cannot say different things:

- ``tables``: every Markdown table, keyed by its section (the nearest ``##`` heading, cut at its first `` (`` or
  ``:``; ``main`` above the first ``##``; a second table in a section gets `` 2``), then by row, then by column
  header. A row's key is its first cell, or its first cells joined by `` | `` where the first cell repeats (the
  fewest leading cells that tell the rows apart). A cell that is one number is stored as a number, any other cell
  as its text (bold and backticks removed); a repeated column header gets `` 2``.
- ``figures``: named scalar figures a script states in prose (``write_results(..., figures={"floor": 5.76})``);
  they are written into the Markdown as the table under ``## Figures``, which becomes this dict.
- ``text``: the prose lines (neither tables nor headings), for figures a results file states only in a sentence.
- ``data``: optional raw data of the script (not parsed from the Markdown; README figures never cite it).

README figures cite these keys (see ``benchmarks/_readme.py`` and docs/design.md's benchmark section). Results
files written before this writer existed got their JSON from the same parser:
``python benchmarks/_report.py --json benchmarks/results/NAME.md``.

Benchmarks import this as a sibling module (``python benchmarks/NAME.py`` puts ``benchmarks/`` on the path).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

import torch

from torchdiffusion._files import atomic_write


def command(script: str, argv: list[str] | None = None) -> str:
    """``Command: `.venv/bin/python benchmarks/SCRIPT ARGS``` (the arguments of this invocation by default)."""
    args = " ".join(argv if argv is not None else sys.argv[1:])
    return f"Command: `.venv/bin/python benchmarks/{script}{' ' + args if args else ''}`"


def machine(t0: float, threads: str = "1 thread", load0: tuple[float, ...] | None = None) -> str:
    """The date, machine, python and torch versions, threads, load average (when ``load0``, taken at the start, is
    given) and the wall-clock seconds since ``t0``."""
    load = (f"load average {load0[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end; "
            if load0 is not None else "")
    return (f"Date: {datetime.datetime.now().isoformat(timespec='seconds')}; machine: `{' '.join(platform.uname())}`, "
            f"{os.cpu_count()} cores; python {sys.version.split()[0]}, torch {torch.__version__}; "
            f"{threads}; {load}total {time.time() - t0:.0f} s (shared machine: seconds are wall-clock under load).")


FIGURES_HEADING = "Figures"
NUMBER = r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?"


def figure_lines(figures: dict[str, float | int | str]) -> list[str]:
    """The ``## Figures`` section that holds a script's named figures (numbers to 6 significant digits)."""
    rows = []
    for name, value in figures.items():
        if not name or "|" in name or "\n" in name:
            raise ValueError(f"a figure's name must be a non-empty line without '|', got {name!r}")
        text = f"{value:.6g}" if isinstance(value, float) else str(value)
        if "|" in text or "\n" in text:
            raise ValueError(f"figure {name!r}: its value must be one line without '|', got {text!r}")
        rows.append(f"| {name} | {text} |")
    return [f"## {FIGURES_HEADING}", "", "Named figures (the README cites them by name; also in the .json beside "
            "this file):", "", "| figure | value |", "|---|---|", *rows]


def write_results(out: Path, lines: list[str], notes: list[str] | None = None, *,
                  figures: dict[str, float | int | str] | None = None, data: dict | None = None,
                  echo: bool = True) -> None:
    """Write a results file ``out`` (``NAME.md``): ``lines``, the ``--note`` lines under "About this run:", the
    named ``figures`` under "## Figures"; and beside it ``NAME.json``, :func:`parse_results` of that text (plus
    the script's raw ``data``, if any). Both written atomically; the text is also printed unless ``echo`` is
    False."""
    if notes:
        lines = [*lines, "", "About this run:", *[f"- {n}" for n in notes]]
    if figures:
        lines = [*lines, "", *figure_lines(figures)]
    text = "\n".join(lines).rstrip("\n") + "\n"
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda tmp: tmp.write_text(text))  # first: a long run's results are never lost to the parser
    if echo:
        print(text, end="")
    try:
        parsed = parse_results(text)
    except ValueError as e:
        raise ValueError(f"{out} was written, but not its .json: {e}") from None
    if figures and set(parsed["figures"]) != set(figures):
        raise ValueError(f"{out}: named figures {sorted(figures)} came back as {sorted(parsed['figures'])}")
    if data is not None:
        parsed["data"] = data
    write_json(out.with_suffix(".json"), parsed)


def write_json(path: Path, obj: dict) -> None:
    """``obj`` as indented JSON (keys in the Markdown's order), atomically."""
    body = json.dumps(obj, indent=1, ensure_ascii=False, allow_nan=False) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(body))


def clean(cell: str) -> str:
    """A cell's text without Markdown emphasis (``**``) and code marks (backticks), spaces collapsed."""
    return " ".join(cell.replace("**", "").replace("`", "").split())


def value(cell: str) -> float | int | str:
    """A cleaned cell as a number where it is exactly one number (thousands commas allowed), else its text."""
    if re.fullmatch(NUMBER, cell):
        s = cell.replace(",", "")
        return int(s) if re.fullmatch(r"[-+]?\d+", s) else float(s)
    return cell


def split_row(line: str) -> list[str]:
    """The cells of a Markdown table line; a ``|`` inside backticks, parentheses or escaped (``\\|``) is text."""
    body = line.strip()
    body = body[1:] if body.startswith("|") else body
    body = body[:-1] if body.endswith("|") and not body.endswith("\\|") else body
    cells, cur, depth, code, i = [], [], 0, False, 0
    while i < len(body):
        ch = body[i]
        if ch == "\\" and body[i + 1:i + 2] == "|":
            cur.append("|")
            i += 2
            continue
        if ch == "`":
            code = not code
        elif not code and ch == "(":
            depth += 1
        elif not code and ch == ")":
            depth = max(depth - 1, 0)
        if ch == "|" and not code and depth == 0:
            cells.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    cells.append("".join(cur))
    return [c.strip() for c in cells]


def _unique(names: list[str]) -> list[str]:
    """``names`` with the second, third, ... occurrence of a name suffixed `` 2``, `` 3``, ..."""
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n} {seen[n]}")
    return out


def row_keys(rows: list[list[str]]) -> list[str]:
    """Each row's key: its first cell, or its fewest leading cells (joined by `` | ``) that tell all rows apart."""
    width = max((len(r) for r in rows), default=1)
    for k in range(1, width + 1):
        keys = [" | ".join(r[:k]) for r in rows]
        if len(set(keys)) == len(keys):
            return keys
    return _unique([" | ".join(r) for r in rows])  # identical rows: numbered


def section_key(heading: str) -> str:
    """A ``##`` heading's table key: its words up to the first `` (`` or ``:``."""
    return re.split(r" \(|:", heading, maxsplit=1)[0].strip()


def parse_results(text: str) -> dict:
    """The machine-readable form of a results file's Markdown (see the module docstring)."""
    title, section = "", "main"
    tables: dict[str, dict] = {}
    figures: dict[str, float | int | str] = {}
    prose: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        if line.startswith("|"):
            block = []
            while i < len(lines) and lines[i].strip().startswith("|"):
                block.append(lines[i].strip())
                i += 1
            if len(block) < 2 or not re.fullmatch(r"\|?[\s:|-]+\|?", block[1]):
                raise ValueError(f"a table must have a header and a |---| line: {block[0][:80]!r}")
            head = _unique([clean(c) or f"column {j + 1}" for j, c in enumerate(split_row(block[0]))])
            rows = [[clean(c) for c in split_row(b)] for b in block[2:]]
            for r in rows:  # a short row is padded; extra cells get their position as header
                head += [f"column {j + 1}" for j in range(len(head), len(r))]
                r += [""] * (len(head) - len(r))
            table = {k: dict(zip(head, map(value, r))) for k, r in zip(row_keys(rows), rows)}
            if section == FIGURES_HEADING:
                figures.update({k: v[head[1]] for k, v in table.items()})
            else:
                key, n = section, 1
                while key in tables:
                    n += 1
                    key = f"{section} {n}"
                tables[key] = table
            continue
        m = re.match(r"(#+)\s+(.*)", line)
        if m:
            if len(m[1]) == 1 and not title:
                title = m[2].strip()
            else:
                section = m[2].strip() if m[2].strip() == FIGURES_HEADING else section_key(m[2])
        elif line:
            prose.append(line)
        i += 1
    return {"title": title, "tables": tables, "figures": figures, "text": prose}


def json_of(md: Path) -> dict:
    """What the ``.json`` beside the results file ``md`` must hold: its parse, plus the raw ``data`` the script
    stored there (kept from the existing ``.json``)."""
    parsed = parse_results(Path(md).read_text())
    old = Path(md).with_suffix(".json")
    if old.exists():
        kept = json.loads(old.read_text())
        if "data" in kept:
            parsed["data"] = kept["data"]
    return parsed


def main(argv: list[str] | None = None) -> int:
    """``python benchmarks/_report.py --json RESULTS.md ...``: (re)write each file's JSON twin from its Markdown."""
    ap = argparse.ArgumentParser(description="write benchmarks/results/NAME.json from NAME.md (the same parser "
                                 "write_results uses)")
    ap.add_argument("--json", nargs="+", required=True, metavar="RESULTS.md")
    a = ap.parse_args(argv)
    for md in map(Path, a.json):
        if md.suffix != ".md" or not md.is_file():
            raise SystemExit(f"--json takes results files NAME.md, got {md}")
        write_json(md.with_suffix(".json"), json_of(md))
        print(f"wrote {md.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
