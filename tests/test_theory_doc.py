"""docs/theory.md covers every item of ../shared/THEORY.md, and every test it names exists."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
THEORY = ROOT.parent / "shared" / "THEORY.md"
DOC = ROOT / "docs" / "theory.md"
ID = r"(?:T-[A-Z]+|B)-\d+"


def test_every_theory_item_has_code_and_tests():
    if not THEORY.is_file():
        pytest.skip("../shared/THEORY.md is not beside this checkout")
    ids = re.findall(rf"^\*\*({ID})\*\*", THEORY.read_text(), re.M)
    rows = {m.group(1): m.group(0) for m in re.finditer(rf"^\| ({ID}) \|.*$", DOC.read_text(), re.M)}
    assert len(ids) > 80
    assert not [i for i in ids if i not in rows], "THEORY items without a row in docs/theory.md"
    untested = [i for i in ids if "`test_" not in rows[i].rsplit("|", 2)[-2]]
    assert not untested, f"items without a test: {untested}"


def test_named_tests_exist():
    defined = {(p.stem, name) for p in (ROOT / "tests").glob("test_*.py")
               for name in re.findall(r"^def (test_\w+)", p.read_text(), re.M)}
    named = set(re.findall(r"`(test_\w+)::(test_\w+)`", DOC.read_text()))
    assert named, "docs/theory.md names no tests"
    assert not sorted(named - defined), f"docs/theory.md names tests that do not exist: {sorted(named - defined)}"
