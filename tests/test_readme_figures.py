"""Every number in the README's prose is bound to its source, and equals it (benchmarks/_readme.py).

Each paragraph, caption or list item with a number carries an HTML comment ``<!-- figures: TOKEN = SOURCE ... -->``
naming, for each number as written, the results-file key (``benchmarks/results/NAME.json``, the twin of NAME.md),
the preset setting or the code constant it comes from, or the quoted phrase that makes it a name (``"issue 17"``).
The rules and the binding syntax are in benchmarks/_readme.py's docstring; ``python benchmarks/_readme.py --suggest``
proposes bindings for new figures. A test of the test below changes one figure of each kind in a copy of the README
and expects the check to fail.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

_spec = importlib.util.spec_from_file_location("bench_readme", ROOT / "benchmarks" / "_readme.py")
rf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rf)


def test_every_readme_figure_equals_its_keyed_value() -> None:
    problems = rf.check(README.read_text())
    assert not problems, "README figures that do not match their source:\n" + "\n".join(problems)


def test_the_tokens_of_each_kind_and_names_inside_words() -> None:
    text = ("Accuracy 0.981 and FD 0.74-1.06x the floor 5.76, 8.4-11.6x faster, 100 % of them, 94 s and 3.5-5 "
            "minutes, 10 of 12 rows, 0.372 +- 0.025 nats, 1,114,209 parameters at 1e-5 on 8x8 and 4x4x4 inputs; "
            "torch 2.13.0, 2000 steps, a 2-D toy; rot180, x0, dpmpp_2m and float64 hold no number.")
    assert [m.group(0) for m in rf.tokens(text)] == [
        "0.981", "0.74-1.06x", "5.76", "8.4-11.6x", "100 %", "94 s", "3.5-5 minutes", "10 of 12", "0.372 +- 0.025",
        "1,114,209", "1e-5", "8x8", "4x4x4", "2.13.0", "2000", "2"]
    assert rf.numbers("9 of 15") == ["9", "15"] and rf.numbers("0.87-1.75x") == ["0.87", "1.75"]
    assert rf.numbers("-991 +- 83") == ["991", "83"] and rf.numbers("7.162e-03") == ["7.162e-03"]


@pytest.mark.parametrize("written,source,ok", [
    ("6.66", 6.66, True), ("6.66", 6.6649, True), ("6.66", 6.655, True), ("6.66", 6.67, False),
    ("1.000", 1.0, True), ("1.000", 0.9996, True), ("1.000", 0.9994, False), ("30", 30.0, True), ("30", 31, False),
    ("0.770", "0.770", True), ("0.77", "0.7749", True), ("7.866e-04", 0.0007866, True),
    ("7.866e-04", "7.867e-04", False), ("1,114,209", "1114209", True)])
def test_a_figure_matches_its_source_after_the_readmes_rounding(written, source, ok) -> None:
    assert rf.matches(written, source) is ok


def _block(text: str, start: str) -> str:
    hits = [b for b in rf.blocks(text) if b.startswith(start)]
    assert len(hits) == 1, start
    return hits[0]


def _mutate(text: str, start: str, old: str, new: str, binding: bool) -> str:
    """``text`` with the first ``old`` figure of the block starting with ``start`` changed to ``new`` in the prose
    (and, with ``binding``, on its binding line too: a figure changed where both are edited)."""
    block = _block(text, start)
    body, sep, comment = block.partition("<!-- figures:")
    pat = rf"(?<![\w.]){re.escape(old)}(?![\w%]|\.\d)"
    assert re.search(pat, body), old
    changed = re.sub(pat, new, body, count=1)
    if binding:
        assert re.search(rf"^\s*{re.escape(old)} = ", comment, re.M), old
        comment = re.sub(rf"^(\s*){re.escape(old)} = ", rf"\g<1>{new} = ", comment, count=1, flags=re.M)
    return text.replace(block, changed + sep + comment, 1)


KINDS = {  # one figure of each kind, where the README states it
    "decimal": ("*`make demo`:", "6.66", "6.67"),
    "integer": ("*The score family on digits", "359", "358"),
    "count": ("- **Few-step sampling**", "9 of 15", "10 of 15"),
    "ratio": ("- **Default sampler and grid", "1.31x", "1.32x"),
    "percentage": ("- **Few-step sampling**", "99 %", "98 %"),
    "value +- se": ("*The 8-Gaussian ring", "0.372 +- 0.025", "0.372 +- 0.026"),
}


@pytest.mark.parametrize("binding", [False, True], ids=["prose only", "prose and binding"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_a_changed_figure_of_each_kind_fails_the_check(kind: str, binding: bool) -> None:
    text = README.read_text()
    start, old, new = KINDS[kind]
    label = rf.label(_block(text, start))
    problems = rf.check(_mutate(text, start, old, new, binding))
    assert any(p.startswith(f"'{label}'") and (new in p or old in p) for p in problems), problems
    assert not [p for p in problems if not p.startswith(f"'{label}'")]  # only that paragraph


def _check(block: str) -> list[str]:
    return rf.check_block(block, rf.Sources())


def test_bindings_that_are_missing_wrong_or_unused_fail() -> None:
    ok = ('FD 6.66 at w = 0.5 for 50 steps, issue 17.\n<!-- figures:\n'
          '6.66 = guidance.tables.main."classifier-free | 0.5".FD\n'
          '0.5 = guidance.tables.main.{"guidance": "classifier-free", "scale": 0.5}.scale\n'
          '50 = preset.digits.sample.steps = py.torchdiffusion.runs.demo.DIGITS_GUIDANCE\n'
          '"issue 17" = name\n-->')
    problems = _check(ok)
    assert problems == ["'FD 6 66 at w 0 5 for 50 steps issue 17': the README says '50' but "
                        "py.torchdiffusion.runs.demo.DIGITS_GUIDANCE holds 0.5"]
    assert not _check(ok.replace(" = py.torchdiffusion.runs.demo.DIGITS_GUIDANCE", ""))
    for broken, why in [
        (ok.replace('"issue 17" = name\n', ""), "no binding line"),
        (ok.replace("| 0.5\".FD", "| 0.7\".FD"), "no row"),
        (ok.replace(".FD\n", ".fd\n"), "no column"),
        (ok.replace("guidance.tables", "nosuchfile.tables", 1), "no results file"),
        (ok.replace("sample.steps", "sample.guidance"), "holds 0.0"),
        (ok.replace('"issue 17" = name', '"issue 18" = name'), "not in the paragraph"),
        (ok.replace("-->", "7.5 = guidance.tables.main.\"classifier-free | 0.5\".FD\n-->"), "not a figure"),
        (ok.replace("-->", "6.66 = guidance.tables.main.\"classifier-free | 0.5\".FD\n-->"), "more binding lines"),
        (ok.replace("FD 6.66", "FD 6.66 and 6.66"), "no binding line"),
        (ok.replace('"scale": 0.5}', '"scale": 9}'), "0 rows match"),
        (ok.replace("-->", "3.36-8.31 = guidance.text.\"no such phrase {}\"\n-->")
         .replace("steps,", "steps, 3.36-8.31,"), "not in the results file"),
    ]:
        got = _check(broken)
        assert any(why in p for p in got), (why, got)


def test_text_sources_need_the_phrase_with_one_reading() -> None:
    good = ('Floor 5.67 (3.36-8.31).\n<!-- figures:\n5.67 = guidance.text."(real held-out vs real train) **{}**"\n'
            '3.36-8.31 = guidance.text."bias-corrected 95 % interval {})"\n-->')
    assert not _check(good)
    vague = good.replace("(real held-out vs real train) **{}**", "FD {}")  # guidance.md says FD 6.66, FD 8.91, ...
    assert any("different numbers" in p for p in _check(vague))
