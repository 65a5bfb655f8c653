"""Every benchmark results file has a machine-readable twin (benchmarks/results/NAME.json beside NAME.md) that is
exactly what the one parser (benchmarks/_report.py) reads from the Markdown, so the two cannot drift apart."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


report = _load("_report")


@pytest.mark.parametrize("md", sorted(RESULTS.glob("*.md")), ids=lambda p: p.name)
def test_each_results_file_has_the_json_its_markdown_parses_to(md: Path) -> None:
    twin = md.with_suffix(".json")
    assert twin.is_file(), f"{twin.name} is missing: run python benchmarks/_report.py --json {md.relative_to(ROOT)}"
    stored = json.loads(twin.read_text())
    stored.pop("data", None)  # the script's raw data, not parsed from the Markdown
    assert stored == report.parse_results(md.read_text()), (
        f"{twin.name} differs from what {md.name} says: rewrite it with the script, or with "
        f"python benchmarks/_report.py --json {md.relative_to(ROOT)}")


MD = """# A benchmark

Command: `x`

Floor **5.67**, interval **3.36-8.31**.

| sampler | steps | w | accuracy | FD range | params |
|---|---|---|---|---|---|
| ddim | 10 | 0 | 0.999 | 8.07-8.81 | 1,114,209 |
| ddim | 10 | 0.5 | **1.000** | 9.64-10.17 | 702,753 |
| `ddpm` | 100 | 0 | 0.992 | q(u \\| k) (a | b) | 12 |

## Second part (details): more

| model | RMS | RMS |
|---|---|---|
| a | 1.5e-03 | 2 |

| model | x |
|---|---|
| b | 3 |
"""


def test_the_parser_keys_tables_by_section_rows_by_leading_cells_and_parses_numbers() -> None:
    d = report.parse_results(MD)
    assert d["title"] == "A benchmark" and d["figures"] == {}
    assert list(d["tables"]) == ["main", "Second part", "Second part 2"]
    main = d["tables"]["main"]
    # "ddim" repeats and so does "ddim | 10": the fewest leading cells that tell rows apart are three
    assert list(main) == ["ddim | 10 | 0", "ddim | 10 | 0.5", "ddpm | 100 | 0"]
    assert main["ddim | 10 | 0.5"] == {"sampler": "ddim", "steps": 10, "w": 0.5, "accuracy": 1.0,
                                       "FD range": "9.64-10.17", "params": 702753}
    assert main["ddpm | 100 | 0"]["FD range"] == "q(u | k) (a | b)"  # an escaped or parenthesised | is text
    assert d["tables"]["Second part"] == {"a": {"model": "a", "RMS": 0.0015, "RMS 2": 2}}
    assert d["tables"]["Second part 2"] == {"b": {"model": "b", "x": 3}}
    assert "Floor **5.67**, interval **3.36-8.31**." in d["text"] and "Command: `x`" in d["text"]


def test_write_results_writes_the_markdown_its_json_and_the_named_figures(tmp_path: Path) -> None:
    out = tmp_path / "bench.md"
    report.write_results(out, MD.splitlines(), ["a note"], figures={"floor": 5.7554, "speed-up": "9.6"},
                         data={"raw": [1, 2]}, echo=False)
    d = json.loads(out.with_suffix(".json").read_text())
    assert d["figures"] == {"floor": 5.7554, "speed-up": 9.6}
    assert d["data"] == {"raw": [1, 2]}
    assert "- a note" in d["text"]
    assert {k: v for k, v in d.items() if k != "data"} == report.parse_results(out.read_text())
    with pytest.raises(ValueError, match="name"):
        report.write_results(tmp_path / "bad.md", ["# x"], figures={"a | b": 1}, echo=False)
    with pytest.raises(ValueError, match="was written, but not its .json"):  # the Markdown is kept
        report.write_results(tmp_path / "table.md", ["# x", "", "| a | b |", "| 1 | 2 |"], echo=False)
    assert (tmp_path / "table.md").read_text().startswith("# x") and not (tmp_path / "table.json").exists()


def test_the_json_command_rewrites_a_twin_and_keeps_its_data(tmp_path: Path) -> None:
    md = tmp_path / "old.md"
    md.write_text(MD)
    md.with_suffix(".json").write_text(json.dumps({"data": {"kept": True}, "tables": {}}))
    assert report.main(["--json", str(md)]) == 0
    d = json.loads(md.with_suffix(".json").read_text())
    assert d["data"] == {"kept": True} and d["tables"]["main"]["ddim | 10 | 0"]["accuracy"] == 0.999
    with pytest.raises(SystemExit, match="NAME.md"):
        report.main(["--json", str(tmp_path / "missing.md")])
