"""The fault benchmark's own classification can fail (issue 33 item 6): ``benchmarks/faults.py`` checks the files a
probe touches afterwards, and a probe whose files come out wrong must be reported as data loss or a silent wrong
result, never as a clean error or a correct result. Fake probes (a few lines of plain Python, no torch: each runs in
well under a second) change a protected file, leave an output, a temp file or a stray file, or write a wrong result;
controls that do everything right are classified clean, so the assertions cannot pass by a classifier that fails
everything."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REFUSE = "print('torchdiffusion: error: refused', file=sys.stderr); sys.exit(2)"


@pytest.fixture(scope="module")
def faults():
    if str(ROOT / "benchmarks") not in sys.path:  # faults.py imports _report from beside it
        sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("faults_benchmark", ROOT / "benchmarks" / "faults.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # (dataclasses look their module up)
    spec.loader.exec_module(mod)
    yield mod
    del sys.modules[spec.name]


def fake(faults, name: str, body: str, argv: list[Path], **kw):
    """A probe running ``body`` (plain Python; ``p`` is the list of argv paths) and classified by ``run_probe``."""
    code = f"import sys, os, pathlib\np = [pathlib.Path(a) for a in sys.argv[1:]]\n{body}\n"
    return faults.run_probe(faults.Probe("test", name, [str(a) for a in argv], python=code, **kw))


def test_a_changed_protected_file_is_data_loss(faults, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.safetensors").write_bytes(b"weights")
    ok = fake(faults, "refuses, changes nothing", REFUSE, [run], names=("refused",))
    assert (ok.outcome, ok.touches, ok.covered) == ("clean error", True, True)
    assert "1 files in 1 inputs byte-identical" in ok.checked
    bad = fake(faults, "refuses after changing the weights", f"(p[0] / 'model.safetensors').write_bytes(b'w')\n"
               f"{REFUSE}", [run], names=("refused",))
    assert bad.outcome == "data loss" and "model.safetensors" in bad.detail and "1 CHANGED" in bad.checked
    added = fake(faults, "refuses after adding a file to the run", f"(p[0] / 'new.json').write_text('1')\n{REFUSE}",
                 [run], names=("refused",))
    assert added.outcome == "data loss" and "new.json" in added.detail
    other = tmp_path / "other.txt"  # a protected file the probe does not name
    other.write_text("keep")
    hidden = fake(faults, "a success that changes a protected file", f"pathlib.Path({str(other)!r}).write_text('x')",
                  [run], expect="ok", protect=(other,), check=lambda: True)
    assert hidden.outcome == "data loss" and "other.txt" in hidden.detail


def test_outputs_temp_files_and_strays(faults, tmp_path: Path) -> None:
    out = tmp_path / "out.npz"
    left = fake(faults, "refuses but leaves its output", f"p[0].write_bytes(b'half')\n{REFUSE}", [out],
                names=("refused",))
    assert left.outcome == "data loss" and "out.npz" in left.detail
    out.unlink()
    folder = tmp_path / "folder"
    folder.mkdir()
    temp = fake(faults, "leaves a temp file", f"(p[0] / '.x.png.{999999}.0123abcd.tmp').write_bytes(b'')\n{REFUSE}",
                [folder], names=("refused",))
    assert temp.outcome == "data loss" and ".tmp" in temp.detail
    for where, body in (("working folder", "open('samples.png', 'w').write('x')"),
                        ("TMPDIR", "open(os.path.join(os.environ['TMPDIR'], 'scratch'), 'w').write('x')")):
        stray = fake(faults, f"writes into its {where}", f"{body}\n{REFUSE}", [tmp_path / "absent.png"],
                     names=("refused",))
        assert stray.outcome == "data loss" and where in stray.detail, (where, stray.detail)


def test_a_wrong_result_is_a_silent_wrong_result(faults, tmp_path: Path) -> None:
    out = tmp_path / "x.txt"
    right = fake(faults, "writes 64", "p[0].write_text('64')", [out], expect="ok",
                 check=lambda: out.read_text() == "64", says="x.txt holds 64")
    assert (right.outcome, right.covered) == ("correct result", True) and "x.txt holds 64" in right.checked
    out.unlink()
    wrong = fake(faults, "writes 63", "p[0].write_text('63')", [out], expect="ok",
                 check=lambda: out.read_text() == "64", says="x.txt holds 64")
    assert wrong.outcome == "silent wrong result" and "x.txt holds 64" in wrong.detail
    out.unlink()
    missing = fake(faults, "writes nothing", "pass", [out], expect="ok", check=lambda: out.read_text() == "64")
    assert missing.outcome == "silent wrong result" and "FileNotFoundError" in missing.detail
    silent = fake(faults, "says nothing of the grid it used", "p[0].write_text('64')", [tmp_path / "y.txt"],
                  expect="ok", names=("using the fitted grid",), check=lambda: True)
    assert silent.outcome == "silent wrong result"
    accepted = fake(faults, "exit 0 where an error was due", "pass", [tmp_path / "z.txt"], names=("refused",))
    assert accepted.outcome == "silent wrong result"


def test_a_stated_change_is_checked_and_the_count_is_computed(faults, tmp_path: Path, monkeypatch) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "a").write_text("1")
    stated = fake(faults, "changes a as stated", "(p[0] / 'a').write_text('2')", [run], expect="ok",
                  changes=(run,), check=lambda: (run / "a").read_text() == "2", says="a holds 2")
    assert (stated.outcome, stated.covered) == ("correct result", True)
    unstated = fake(faults, "changes a, check wrong", "(p[0] / 'a').write_text('3')", [run], expect="ok",
                    changes=(run,), check=lambda: (run / "a").read_text() == "2", says="a holds 2")
    assert unstated.outcome == "silent wrong result"
    blind = fake(faults, "an output nobody checks", "p[0].write_text('?')", [tmp_path / "o.txt"], expect="ok")
    assert (blind.touches, blind.covered) == (True, False) and "UNCHECKED" in blind.checked
    none = fake(faults, "a pure argument error", REFUSE, [], names=("refused",))
    assert (none.outcome, none.touches, none.covered) == ("clean error", False, False)
    monkeypatch.setattr(faults, "RESULTS", tmp_path / "faults.md")
    faults.write_results([stated, unstated, blind, none], [], True, True, 1.0)
    text = (tmp_path / "faults.md").read_text()
    assert "**2 of 3 probes that touch files check them afterwards** (1 of the 4 touch none" in text
    assert "NOT checked: an output nobody checks" in text
