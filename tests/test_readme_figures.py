"""Every figure the README states is in a results file that a benchmark script wrote (benchmarks/results/*.md).

The rule, applied to the README's prose, bullets, tables and captions (code blocks, indented code and `inline
code` are commands, not claims, and are skipped):

- a figure is a decimal number (``0.322``), a range of numbers (``0.74-1.06``), a ratio (``8.4-11.6x``, ``0.5x``),
  a percentage (``100 %``), a duration (``94 s``, ``3.5-5 minutes``) or a count ``N of M``;
- every paragraph or list item that states a figure names its source, a benchmark (``benchmarks/NAME.py``) or its
  results file (``benchmarks/results/NAME.md``), and each figure appears in one of the named results files as the
  same token (ratios with or without their ``x``; durations and percentages with or without the space before the
  unit). Integers on their own (steps, sample counts, sizes) are settings, not checked; sizes like ``8x8`` and
  versions like ``2.13.0`` are not figures.

Typing a figure into the README that its benchmark did not print fails the test for that paragraph.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS = sorted((ROOT / "benchmarks" / "results").glob("*.md"))

NUM = r"\d+(?:\.\d+)?"
SPAN = rf"{NUM}(?:-{NUM})?"
FIGURE = re.compile(
    rf"(?<![\w.\-])(?:(?P<count>\d+ of \d+)"
    rf"|(?P<ratio>{SPAN})x(?![\w])"
    rf"|(?P<pct>{SPAN}) ?%"
    rf"|(?P<dur>{SPAN}) ?(?P<unit>s|ms|seconds|minutes|min|hours)(?![\w])"
    rf"|(?P<num>\d+\.\d+(?:-{NUM})?|\d+-\d+\.\d+))(?![\w.]*\d)")


CITE = re.compile(r"benchmarks/(?:results/)?(\w+)\.(?:py|md)")


def blocks(text: str) -> list[str]:
    """The README's paragraphs and list items (raw), code blocks and indented code left out."""
    text = re.sub(r"```.*?```", "\n\n", text, flags=re.S)
    text = "\n".join(line for line in text.splitlines() if not line.startswith("    "))
    return [b.strip() for b in re.split(r"\n\s*\n|\n(?=- )", text) if b.strip()]


def prose(block: str) -> str:
    """A block's words: inline code (commands) and link targets (paths) removed."""
    return re.sub(r"\]\([^)]*\)", "]", re.sub(r"`[^`]*`", " ", block))


def figures(paragraph: str) -> list[str]:
    """The figures of a paragraph (see the module docstring), as they read."""
    return [m.group(0) for m in FIGURE.finditer(paragraph)]


def in_results(fig: str, corpus: str) -> bool:
    """Whether ``fig`` appears in the results text as the same token."""
    m = FIGURE.fullmatch(fig)
    assert m is not None, fig
    if m["ratio"]:
        pat = re.escape(m["ratio"]) + r" ?x?"
    elif m["pct"]:
        pat = re.escape(m["pct"]) + r" ?%"
    elif m["dur"]:
        pat = re.escape(m["dur"]) + r" ?" + re.escape(m["unit"])
    else:
        pat = re.escape(fig)
    return re.search(rf"(?<![\w.\-]){pat}(?![\w]|\.\d|-\d)", corpus) is not None


def _paragraphs() -> list[tuple[str, list[str], list[str]]]:
    """(the block's first words, its figures, the results files it names) for every block with figures."""
    out = []
    for b in blocks(README.read_text()):
        figs = figures(prose(b))
        if figs:
            out.append((re.sub(r"\W+", " ", b)[:40].strip(), figs, sorted(set(CITE.findall(b)))))
    return out


def test_the_rule_finds_figures_and_skips_settings() -> None:
    text = ("Accuracy 0.981 and FD 0.74-1.06x the floor 5.76, 8.4-11.6x faster, 100 % of them, 94 s and 3.5-5 "
            "minutes, 10 of 12 rows; 8x8 digits, 4x4x4 latent, torch 2.13.0, 2000 steps, 2-core, `--guidance 0.5`.")
    assert figures(prose(blocks(text)[0])) == ["0.981", "0.74-1.06x", "5.76", "8.4-11.6x", "100 %", "94 s",
                                               "3.5-5 minutes", "10 of 12"]
    corpus = "| 0.9810 | ratio 0.74-1.06 | 5.76 | 8.4-11.6x | 100% | 94s | 3.5-5 minutes | 10 of 12 |"
    assert not in_results("0.981", corpus)  # the same token, not a prefix of another number
    assert all(in_results(f, corpus) for f in ("0.74-1.06x", "5.76", "8.4-11.6x", "100 %", "94 s", "10 of 12"))
    assert not in_results("5.7", corpus) and not in_results("0.74x", corpus)


def test_blocks_and_citations() -> None:
    text = "Intro 0.5x.\n\n- A (`benchmarks/latent.py`): 8.4x\n- B (benchmarks/results/ring.md) 0.1\n\n```\n3.5\n```"
    assert blocks(text) == ["Intro 0.5x.", "- A (`benchmarks/latent.py`): 8.4x", "- B (benchmarks/results/ring.md) 0.1"]
    assert [CITE.findall(b) for b in blocks(text)] == [[], ["latent"], ["ring"]]


@pytest.mark.parametrize("paragraph,figs,cited", _paragraphs(), ids=[p for p, _, _ in _paragraphs()])
def test_every_readme_figure_is_in_its_results_file(paragraph: str, figs: list[str], cited: list[str]) -> None:
    files = [f for f in RESULTS if f.stem in cited]
    assert files, (f"README paragraph '{paragraph}...' states {figs} but names no benchmarks/NAME.py or "
                   "benchmarks/results/NAME.md with a results file")
    corpus = "\n".join(f.read_text() for f in files)
    missing = [f for f in figs if not in_results(f, corpus)]
    assert not missing, (f"README paragraph '{paragraph}...': {missing} appear in none of "
                         f"{[f'benchmarks/results/{f.name}' for f in files]}")
