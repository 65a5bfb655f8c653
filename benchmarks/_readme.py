"""Every number in the README's prose is bound to where it comes from, and this module checks the bindings.

The README's prose is its paragraphs, list items, captions, tables and headings; code blocks, indented code,
``inline code`` (commands) and link targets are not prose. A number there is a figure token: a decimal or whole
number (``0.322``, ``1797``, ``1,114,209``), a range (``0.74-1.06``), a ratio (``1.32x``), a percentage
(``99 %``), a duration (``94 s``, ``3.5-5 minutes``), a count (``9 of 15``), a value with its standard error
(``0.372 +- 0.025``), a size (``8x8``), a number in scientific notation (``1e-5``) or a version (``2.13.0``).
Digits inside a word (``rot180``, ``x0``, ``dpmpp_2m``) are part of a name, not a number.

Each paragraph (block) whose prose has a figure token carries, anywhere inside it, an HTML comment (invisible on
the rendered page) with one line per token::

    <!-- figures:
    6.66 = digits_quality.tables.main."ddim | 50 steps (100 evals) | 0.5"."FD (mean of chunks)"
    5.67 = digits_quality.text."real train, 359 vs 1438 digits): **{}**"
    0.87-1.75x = digits_quality.text."FD 4.91-9.91 ({}x the floor"
    6 of 8 = digits_quality.text."; {} inside the floor's"
    50 = preset.digits.sample.steps
    0.5 = py.torchdiffusion.runs.demo.DIGITS_GUIDANCE = digits_quality.tables.main."ddim | 50 steps (100 evals) | 0.5".w
    "issue 17" = name
    -->

Left of `` = `` the token as the prose writes it, one line per occurrence (in the paragraph's order where the same
token means different things); right, its source (several joined by `` & ``: their numbers in order, as for
``9 of 15``), or several sources each of which must hold it (``0.5 = SOURCE = SOURCE``). A source is one of

- ``NAME.tables.TABLE.ROW.COLUMN``: a cell of ``benchmarks/results/NAME.json`` (the twin of ``NAME.md``, written
  by ``benchmarks/_report.py``; keys as that module describes them). A key that is not a word is written as a JSON
  string (``"ddim | 50 steps (100 evals) | 0.5"``); in place of the row key a JSON object picks the one row whose
  cells have those values (``{"model": "likelihood_digits", "method": "ode"}``). ``[i]`` after the column picks
  the i-th number of a cell that holds several (``0.372 +- 0.025``: ``[0]`` is 0.372).
- ``NAME.figures.KEY``: a named figure the script wrote.
- ``NAME.text."... {} ..."``: a figure the results file states only in prose; the phrase, with ``{}`` where the
  number (or range) stands, must occur in the file's text or in a text cell of its tables, always with the
  same numbers.
- ``preset.PRESET.SECTION.KEY``: a setting of a preset (``torchdiffusion config PRESET``); ``py.MODULE.NAME``: a
  constant of the code (``py.torchdiffusion.runs.demo.DIGITS_GUIDANCE``).
- ``name``: the quoted phrase on the left (``"issue 17"``, ``"2-D"``, ``"kill -9"``) names something; its numbers
  are labels, not figures. Settings that no results file or config holds are listed the same way.

A token's numbers must equal its source's numbers after the README's rounding (a token written with two decimals
matches a source that rounds to it); a source whose numbers differ, a missing source, a figure token without a
binding, or a binding whose token is not in the paragraph each fail ``tests/test_readme_figures.py``.

``python benchmarks/_readme.py`` prints the problems; ``--suggest`` also prints, for each unbound token, binding
lines that would match it in the results files the paragraph cites (check that the suggested key is the figure
the sentence means before pasting it).
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import sys
from decimal import ROUND_HALF_EVEN, ROUND_HALF_UP, Decimal, InvalidOperation
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

NUM = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
SPAN = rf"{NUM}(?:-{NUM})?"
TOKEN = re.compile(
    rf"(?<![\w.])(?:(?P<pm>{NUM} \+- {NUM})"
    rf"|(?P<count>\d+ of \d+)"
    rf"|(?P<version>\d+(?:\.\d+){{2,}})"
    rf"|(?P<size>\d+(?:x\d+)+)"
    rf"|(?P<sci>{NUM}e[-+]?\d+)"
    rf"|(?P<ratio>{SPAN}x)"
    rf"|(?P<pct>{SPAN} ?%)"
    rf"|(?P<dur>{SPAN} ?(?:ms|s|seconds|minutes|min|hours))"
    rf"|(?P<num>{SPAN}))(?![\w%]|\.\d)")
SCI_NUMBER = re.compile(rf"{NUM}(?:[eE][-+]?\d+)?")
COMMENT = re.compile(r"<!--\s*figures:(.*?)-->", re.S)


def blocks(text: str) -> list[str]:
    """The README's paragraphs, list items, table rows' blocks and headings (raw text with their comments);
    fenced code blocks and indented code left out."""
    text = re.sub(r"```.*?```", "\n\n", text, flags=re.S)
    text = "\n".join(line for line in text.splitlines() if not line.startswith("    "))
    return [b.strip() for b in re.split(r"\n\s*\n|\n(?=- )|\n(?=#)", text) if b.strip()]


def prose(block: str) -> str:
    """A block's prose on one line: HTML comments, inline code (commands) and link targets (paths) removed."""
    block = re.sub(r"<!--.*?-->", " ", block, flags=re.S)
    return " ".join(re.sub(r"\]\([^)]*\)", "]", re.sub(r"`[^`]*`", " ", block)).split())


def tokens(text: str) -> list[re.Match]:
    """The figure tokens of ``text`` (see the module docstring)."""
    return list(TOKEN.finditer(text))


def numbers(text: str) -> list[str]:
    """The numbers of a token or a cell's text, as written (``'9 of 15'`` -> ``['9', '15']``)."""
    return [m.group(0) for m in re.finditer(rf"(?<![\w.]){SCI_NUMBER.pattern}", text)]


def matches(written: str, source: float | int | str) -> bool:
    """Whether the README's ``written`` number equals ``source`` after the README's rounding (half up or half to
    even, whichever the source's writer used)."""
    w = written.replace(",", "")
    try:
        src = Decimal(str(source).replace(",", ""))
        want = Decimal(w)
    except InvalidOperation:
        return False
    if "e" in w.lower():  # scientific notation: equal to the digits written
        exp = want.adjusted() - (len(want.as_tuple().digits) - 1)
        q = Decimal(1).scaleb(exp)
    else:
        q = Decimal(1).scaleb(-len(w.split(".")[1]) if "." in w else 0)
    return any(src.quantize(q, rounding=r) == want for r in (ROUND_HALF_UP, ROUND_HALF_EVEN))


class BindingError(ValueError):
    """A binding that cannot be read or resolved."""


def _segments(path: str) -> list:
    """``a.b."c d".{"k": "v"}.e[2]`` -> ``['a', 'b', 'c d', {'k': 'v'}, 'e', 2]``."""
    out: list = []
    dec = json.JSONDecoder()
    i = 0
    while i < len(path):
        if path[i] in "\"{":
            try:
                seg, i = dec.raw_decode(path, i)
            except json.JSONDecodeError as e:
                raise BindingError(f"cannot read {path[i:]!r}: {e.msg}") from None
            out.append(seg)
        else:
            m = re.match(r"[\w-]+", path[i:])
            if not m:
                raise BindingError(f"cannot read {path[i:]!r} in {path!r}")
            out.append(m.group(0))
            i += m.end()
        m = re.match(r"\[(\d+)\]", path[i:])
        if m:
            out.append(int(m[1]))
            i += m.end()
        if i < len(path):
            if path[i] != ".":
                raise BindingError(f"expected '.' at {path[i:]!r} in {path!r}")
            i += 1
    return out


def split_outside_quotes(text: str, sep: str) -> list[str]:
    """``text`` split at ``sep`` where it is not inside a JSON string (``a & b."x & y"`` -> ``a``, ``b."x & y"``)."""
    parts, cur, quoted, esc, i = [], [], False, False, 0
    while i < len(text):
        ch = text[i]
        if quoted and esc:
            esc = False
        elif quoted and ch == "\\":
            esc = True
        elif ch == '"':
            quoted = not quoted
        elif not quoted and text.startswith(sep, i):
            parts.append("".join(cur).strip())
            cur, i = [], i + len(sep)
            continue
        cur.append(ch)
        i += 1
    parts.append("".join(cur).strip())
    return parts


class Sources:
    """Resolves a binding's source to the numbers it holds (results files are read once)."""

    def __init__(self, results: Path = RESULTS):
        self.results = results
        self._json: dict[str, dict] = {}

    def results_json(self, name: str) -> dict:
        if name not in self._json:
            path = self.results / f"{name}.json"
            if not path.is_file():
                raise BindingError(f"no results file benchmarks/results/{name}.json")
            self._json[name] = json.loads(path.read_text())
        return self._json[name]

    def resolve(self, source: str) -> list[str]:
        """The numbers (as text) of one source."""
        seg = _segments(source)
        if len(seg) < 2:
            raise BindingError(f"source {source!r} names no key")
        head = seg[0]
        if head == "preset":
            return self._preset(seg[1:], source)
        if head == "py":
            return self._code(seg[1:], source)
        doc = self.results_json(head)
        kind = seg[1]
        if kind == "text":
            if len(seg) != 3 or not isinstance(seg[2], str) or "{}" not in seg[2]:
                raise BindingError(f"{source}: text takes one quoted phrase with {{}} where the figure stands")
            cells = [v for t in doc["tables"].values() for r in t.values() for v in r.values() if isinstance(v, str)]
            return self._text(doc["text"] + cells, seg[2], source)
        if kind == "figures":
            node = doc["figures"]
            rest = seg[2:]
        elif kind == "tables":
            if len(seg) < 5:
                raise BindingError(f"{source}: tables.TABLE.ROW.COLUMN expected")
            table = self._get(doc["tables"], seg[2], source, "table")
            row = self._row(table, seg[3], source)
            node = row
            rest = seg[4:]
        else:
            raise BindingError(f"{source}: after the file comes tables, figures or text, not {kind!r}")
        pick = None
        if rest and isinstance(rest[-1], int):
            pick = rest.pop()
        if len(rest) != 1:
            raise BindingError(f"{source}: expected one key after the {'row' if kind == 'tables' else kind}")
        v = self._get(node, rest[0], source, "column" if kind == "tables" else "figure")
        nums = [str(v)] if isinstance(v, (int, float)) and not isinstance(v, bool) else numbers(str(v))
        if pick is not None:
            if pick >= len(nums):
                raise BindingError(f"{source}: the cell {v!r} has {len(nums)} numbers, no [{pick}]")
            nums = [nums[pick]]
        return nums

    @staticmethod
    def _get(node: dict, key, source: str, what: str):
        if not isinstance(key, str) or key not in node:
            raise BindingError(f"{source}: no {what} {key!r} (there are: {', '.join(map(repr, list(node)[:12]))})")
        return node[key]

    @staticmethod
    def _row(table: dict, key, source: str) -> dict:
        if isinstance(key, dict):
            hits = [r for r in table.values() if all(str(r.get(k)) == str(v) for k, v in key.items())]
            if len(hits) != 1:
                raise BindingError(f"{source}: {len(hits)} rows match {key} (one is needed)")
            return hits[0]
        return Sources._get(table, key, source, "row")

    @staticmethod
    def _text(lines: list[str], phrase: str, source: str) -> list[str]:
        pat = re.compile(r"(?<![\w.])" * phrase.startswith("{}") + f"({SPAN}|{SCI_NUMBER.pattern})".join(
            map(re.escape, phrase.split("{}"))) + r"(?![\w]|\.\d)" * phrase.endswith("{}"))
        found = {tuple(n for g in m.groups() for n in numbers(g)) for line in lines for m in pat.finditer(line)}
        if not found:
            raise BindingError(f"{source}: the phrase is not in the results file's text")
        if len(found) > 1:
            raise BindingError(f"{source}: the phrase occurs with different numbers {sorted(found)}")
        return list(found.pop())

    @staticmethod
    def _preset(seg: list, source: str) -> list[str]:
        from torchdiffusion.runs import config as config_mod  # only where a binding names a preset

        try:
            node = config_mod.resolve(str(seg[0]))
        except ValueError as e:
            raise BindingError(f"{source}: {e}") from None
        for k in seg[1:]:
            node = Sources._get(node, k, source, "config key")
        return numbers(str(node)) if not isinstance(node, (int, float)) else [str(node)]

    @staticmethod
    def _code(seg: list, source: str) -> list[str]:
        names = [str(s) for s in seg]
        for cut in range(len(names) - 1, 0, -1):
            try:
                node = importlib.import_module(".".join(names[:cut]))
            except ImportError:
                continue
            for attr in names[cut:]:
                if not hasattr(node, attr):
                    raise BindingError(f"{source}: {'.'.join(names[:cut])} has no {attr!r}")
                node = getattr(node, attr)
            return [str(node)] if isinstance(node, (int, float)) else numbers(str(node))
        raise BindingError(f"{source}: no importable module")


def bindings(block: str) -> list[tuple[str, str]]:
    """The (token or quoted name, source) lines of a block's ``<!-- figures: ... -->`` comments."""
    out = []
    for body in COMMENT.findall(block):
        for line in body.splitlines():
            line = line.strip()
            if not line:
                continue
            if line.startswith('"'):
                try:
                    left, end = json.JSONDecoder().raw_decode(line)
                except json.JSONDecodeError:
                    raise BindingError(f"cannot read the quoted name in {line!r}") from None
                right = line[end:].strip()
                if not right.startswith("="):
                    raise BindingError(f"expected '= SOURCE' after the name in {line!r}")
                out.append(('"' + left + '"', right[1:].strip()))
            else:
                left, sep, right = line.partition(" = ")
                if not sep:
                    raise BindingError(f"a binding line reads 'TOKEN = SOURCE', got {line!r}")
                out.append((left.strip(), right.strip()))
    return out


def label(block: str) -> str:
    """A block's first words, to name it in messages."""
    return re.sub(r"\W+", " ", prose(block))[:50].strip()


def check_block(block: str, sources: Sources) -> list[str]:
    """The problems of one block: unbound tokens, bindings whose token is absent, sources that disagree."""
    text = prose(block)
    toks = tokens(text)
    try:
        binds = bindings(block)
    except BindingError as e:
        return [f"'{label(block)}': {e}"]
    if not toks and not binds:
        return []
    where = f"'{label(block)}'"
    problems = []
    covered = [False] * len(toks)
    binds.sort(key=lambda b: not b[0].startswith('"'))  # names first: they claim the tokens inside them
    for left, source in binds:
        if left.startswith('"'):  # a name: its occurrences cover the tokens inside them
            phrase = left[1:-1]
            spans = [(m.start(), m.end()) for m in re.finditer(re.escape(phrase), text)]
            if not spans:
                problems.append(f"{where}: the name {phrase!r} is not in the paragraph")
            if source != "name":
                problems.append(f"{where}: a quoted phrase is bound to 'name', not {source!r}")
            for i, t in enumerate(toks):
                if any(a <= t.start() and t.end() <= b for a, b in spans):
                    covered[i] = True
            continue
        hits = [i for i, t in enumerate(toks) if t.group(0) == left and not covered[i]]
        if not hits:  # one binding line per occurrence of the token, in order
            n = sum(t.group(0) == left for t in toks)
            problems.append(f"{where}: bound figure {left!r} is not a figure of the paragraph" if not n else
                            f"{where}: {left!r} occurs {n} times but has more binding lines")
            continue
        covered[hits[0]] = True
        if source == "name":
            problems.append(f"{where}: 'name' binds a quoted phrase, not the figure {left!r}")
            continue
        want = numbers(left)
        for expr in split_outside_quotes(source, " = "):  # every source of the line must hold the figure
            try:
                got = [n for s in split_outside_quotes(expr, " & ") for n in sources.resolve(s)]
            except BindingError as e:
                problems.append(f"{where}: {left}: {e}")
                continue
            if len(got) != len(want) or not all(matches(w, g) for w, g in zip(want, got)):
                problems.append(f"{where}: the README says {left!r} but {expr} holds {', '.join(got) or 'nothing'}")
    unbound = [t.group(0) for t, c in zip(toks, covered) if not c]
    if unbound:
        problems.append(f"{where}: figures with no binding line (one per occurrence): {unbound}")
    return problems


def check(readme: str, results: Path = RESULTS) -> list[str]:
    """Every problem of the README's figures (empty when each figure equals its keyed value)."""
    sources = Sources(results)
    return [p for b in blocks(readme) for p in check_block(b, sources)]


CITE = re.compile(r"benchmarks/(?:results/)?(\w+)\.(?:py|md|json)")


def suggest(block: str, results: Path = RESULTS) -> list[str]:
    """Binding lines that would match the block's unbound tokens in the results files it cites."""
    sources = Sources(results)
    bound = [left for left, _ in bindings(block)]
    out = []
    for t in tokens(prose(block)):
        if t.group(0) in bound:
            bound.remove(t.group(0))
            continue
        want = numbers(t.group(0))
        hits = []
        for name in sorted(set(CITE.findall(block))):
            try:
                doc = sources.results_json(name)
            except BindingError:
                continue
            for tk, table in doc["tables"].items():
                for rk, row in table.items():
                    for col, v in row.items():
                        nums = [str(v)] if isinstance(v, (int, float)) else numbers(str(v))
                        ref = f"{name}.tables.{json.dumps(tk)}.{json.dumps(rk)}.{json.dumps(col)}"
                        if len(nums) == len(want) and all(matches(w, g) for w, g in zip(want, nums)):
                            hits.append(ref)
                        elif len(want) == 1:
                            hits += [f"{ref}[{i}]" for i, g in enumerate(nums) if len(nums) > 1 and matches(want[0], g)]
            for k, v in doc["figures"].items():
                if len(want) == 1 and matches(want[0], v):
                    hits.append(f"{name}.figures.{json.dumps(k)}")
            for line in doc["text"]:
                for m in tokens(line):
                    got = numbers(m.group(0))
                    if len(got) == len(want) and all(matches(w, g) for w, g in zip(want, got)):
                        a = max(0, m.start() - 30)
                        a = line.find(" ", a, m.start()) + 1 or a  # start the phrase at a word
                        end = m.start() + len(re.match(SPAN, m.group(0))[0])
                        hits.append(f"{name}.text.{json.dumps(line[a:m.start()] + '{}' + line[end:end + 3])}")
        out += [f"{t.group(0)} = {h}" for h in hits[:6]] or [f"{t.group(0)} = ?"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="check the README's figures against their bindings")
    ap.add_argument("--readme", default=str(ROOT / "README.md"))
    ap.add_argument("--suggest", action="store_true", help="print candidate bindings for unbound figures")
    a = ap.parse_args(argv)
    text = Path(a.readme).read_text()
    problems = check(text)
    print("\n".join(problems) or "every README figure equals its keyed value")
    if a.suggest:
        for b in blocks(text):
            lines = suggest(b)
            if lines:
                print(f"\n## {label(b)}\n<!-- figures:\n" + "\n".join(lines) + "\n-->")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
