"""The layers of docs/design.md section 4, checked from the imports of src/torchdiffusion.

A module imports only from a lower layer or from inside its own folder; folders of one layer do not import
each other (one exception: losses may use likelihood); there is no import cycle; our own modules are imported
at module level (an import inside a function is for optional third-party packages only).
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "torchdiffusion"
LAYERS = {  # top-level module or folder -> layer
    "_tensor": 0, "_files": 0, "processes": 1, "nets": 1, "parameterization": 2, "oracle": 2.5, "samplers": 3,
    "losses": 3, "likelihood": 3, "data": 3, "training": 4, "evaluation": 4, "runs": 5, "studio": 5.5, "cli": 6,
    "__init__": 7, "__main__": 7,
}
ALLOWED_SAME_LAYER = {("losses", "likelihood")}


def modules() -> dict[str, Path]:
    out = {}
    for f in SRC.rglob("*.py"):
        rel = f.relative_to(SRC.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


MODULES: set[str] = set()


def own_imports(name: str, path: Path) -> list[tuple[str, int, bool]]:
    """(imported module of ours, line, at module level) for every import in the file."""
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    here = name.split(".") if is_pkg else name.split(".")[:-1]
    top_level = {id(n) for n in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in MODULES else mod for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for t in targets:
            if t == "torchdiffusion" or t.startswith("torchdiffusion."):
                found.append((t, node.lineno, id(node) in top_level))
    return found


def resolve(target: str, mods: dict[str, Path]) -> str | None:
    while target and target not in mods:
        target = target.rsplit(".", 1)[0] if "." in target else ""
    return target or None


def room(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def edges() -> tuple[dict[str, set[str]], list[str]]:
    mods = modules()
    MODULES.update(mods)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    problems = []
    for name, path in mods.items():
        for target, line, top in own_imports(name, path):
            dep = resolve(target, mods)
            if dep is None or dep == name or dep == "torchdiffusion" and target != "torchdiffusion":
                continue
            if dep == "torchdiffusion" and room(name) != "__init__":
                problems.append(f"{name}:{line} imports the package root")
                continue
            graph[name].add(dep)
            if not top:
                problems.append(f"{name}:{line} imports {dep} inside a function")
            a, b = room(name), room(dep)
            if a == b or b == "__init__" and a == "__init__":
                continue
            la, lb = LAYERS[a], LAYERS[b]
            if lb > la:
                problems.append(f"{name}:{line} (layer {la}) imports {dep} (higher layer {lb})")
            elif lb == la and (a, b) not in ALLOWED_SAME_LAYER:
                problems.append(f"{name}:{line} imports {dep} from another folder of layer {la}")
    return graph, sorted(set(problems))


def test_every_module_has_a_layer():
    rooms = {room(m) for m in modules()}
    assert rooms <= set(LAYERS), f"modules outside the layer map: {sorted(rooms - set(LAYERS))}"


def test_imports_follow_the_layers():
    _, problems = edges()
    assert not problems, "\n".join(problems)


def test_no_import_cycle():
    graph, _ = edges()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (cycle := visit(d)):
                return cycle
        state[m] = 2
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            raise AssertionError("import cycle: " + " -> ".join(cycle))
