"""The layers contract (docs/ARCHITECTURE.md), checked on the source with `ast`: no module imports
a higher layer or an independent sibling, and no two modules import each other, directly or
around a longer circle. Imports inside functions count the same as top-level ones: hiding an
import in a function does not change which layer depends on which.

Run it as `python tests/layers.py` (make lint does); tests/test_layers.py checks that it passes on
this tree and fails on a tree with an upward import or a circle.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

# Bottom up. Packages on one line are independent: neither may import the other.
LAYERS: list[tuple[str, ...]] = [
    ("mlxpt", "mlxpt.errors", "mlxpt._blas", "mlxpt.launch"),  # "mlxpt": the __init__ alone; launch: mlx.launch, fixed
    ("mlxpt.config",),
    ("mlxpt.runs",),
    ("mlxpt.data", "mlxpt.models"),
    ("mlxpt.objectives", "mlxpt.rewards"),
    ("mlxpt.backends",),
    ("mlxpt.decode",),
    ("mlxpt.train", "mlxpt.fuse"),
    ("mlxpt.pipeline", "mlxpt.serve"),  # recipes of stages (train + eval, a report); the OpenAI-compatible server
    ("mlxpt.commands",),
    ("app",),
    ("mlxpt.cli", "mlxpt.commands.tui"),  # entry points: the CLI dispatches, `mlxpt tui` opens the app
]


def _unit(module: str) -> tuple[int, str] | None:
    """(layer index, unit name) of a module: the longest unit prefix that matches."""
    best = None
    for i, units in enumerate(LAYERS):
        for u in units:
            inside = module == u or (u != "mlxpt" and module.startswith(u + "."))
            if inside and (best is None or len(u) > len(best[1])):
                best = (i, u)
    return best


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def _imports(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Every module this one imports (absolute names; relative imports resolved)."""
    out: set[str] = set()
    pkg = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import module`
    return out


def graph(root: Path, packages: tuple[str, ...] = ("mlxpt", "app")) -> dict[str, set[str]]:
    """module -> the project modules it imports (those that exist as files under `root`)."""
    files = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            files[_module_name(root, path)] = path
    edges: dict[str, set[str]] = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        found = _imports(tree, name, path.name == "__init__.py")
        edges[name] = {m for m in found if m in files and m != name}
    return edges


def _circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on, stack, out, counter = set(), [], [], [0]
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on.add(start)
        while work:
            node, it = work[-1]
            nxt = next(it, None)
            if nxt is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        m = stack.pop()
                        on.discard(m)
                        comp.append(m)
                        if m == node:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
            elif nxt not in index:
                index[nxt] = low[nxt] = counter[0]
                counter[0] += 1
                stack.append(nxt)
                on.add(nxt)
                work.append((nxt, iter(sorted(edges[nxt]))))
            elif nxt in on:
                low[node] = min(low[node], index[nxt])
    return out


def _is_parent_package(a: str, b: str) -> bool:
    """A package's __init__ re-exporting its own modules is not a circle through them."""
    return b.startswith(a + ".") or a.startswith(b + ".")


def violations(root: Path) -> list[str]:
    """One line per broken rule; empty when the tree keeps the contract."""
    edges = graph(root)
    problems = []
    for mod in sorted(edges):
        src = _unit(mod)
        if src is None:
            problems.append(f"{mod}: not in any layer (add it to LAYERS in tests/layers.py)")
            continue
        for dep in sorted(edges[mod]):
            dst = _unit(dep)
            if dst is None or dst[1] == src[1]:
                continue
            if dst[0] > src[0]:
                problems.append(f"{mod} imports {dep}: {src[1]} (layer {src[0]}) may not import the higher {dst[1]}")
            elif dst[0] == src[0]:
                problems.append(f"{mod} imports {dep}: {src[1]} and {dst[1]} are independent siblings")
    # module-level circles; a package __init__ and its own submodules are one unit for this
    pruned = {m: {d for d in deps if not _is_parent_package(m, d)} for m, deps in edges.items()}
    for comp in _circles(pruned):
        problems.append("import circle: " + " -> ".join(comp))
    return problems


def main() -> int:
    root = Path(__file__).resolve().parent.parent
    problems = violations(root)
    for p in problems:
        print(p)
    print(f"layers: {len(problems)} violation(s) in {len(graph(root))} modules")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
