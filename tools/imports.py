"""Import structure of moex: cycles, upward imports, function-level imports, largest functions.

    python tools/imports.py                 # the report
    python tools/imports.py --check         # exit 1 if a cycle or an upward import exists

Reads the source with `ast` (nothing is imported). A module's imports are every
`import moex...` / `from moex... import ...` (and checkpoints_convert) in it, at module level or
inside a function. `from pkg import name` counts as an import of `pkg.name` when that is a module.

Cycles: strongly connected components of the module graph (module-level and function-level edges
alike: a function-level import only hides a cycle from the interpreter, it does not remove it).
Upward imports: an import from a unit to one later in LAYERS (lowest first); a unit is a module
or a package, and modules of one unit may import each other.
"""

from __future__ import annotations

import argparse
import ast
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("moex", "checkpoints_convert")

# lowest first: a unit may import itself and the units before it; the root `moex` re-exports
# the public API, so it sits on top
LAYERS = (
    "moex.config", "moex.tokenizer", "moex.nn", "moex.data", "moex.model", "moex.checkpoint",
    "moex.info", "moex.generate", "moex.seq2seq", "moex.measure", "moex.training", "moex.eval", "moex.offload",
    "moex.perf", "moex.upcycle", "moex.predict", "moex.train_vlm", "checkpoints_convert", "moex.experiments",
    "moex.cli", "moex",
)


def modules(root: pathlib.Path = ROOT) -> dict[str, pathlib.Path]:
    """Dotted name -> file of every module of the packages."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _resolve(name: str, known: dict) -> str | None:
    """The longest known module that `name` is or lies inside."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def imports(mod: str, path: pathlib.Path, known: dict) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) for each import of a package module."""
    tree = ast.parse(path.read_text(), str(path))
    found = []

    def visit(node, in_function: bool):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                      ast.Lambda))
            names = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
                    for _ in range(child.level - 1):
                        pkg = pkg.rpartition(".")[0]
                    base = f"{pkg}.{base}" if base else pkg
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                         for a in child.names]
            for n in names:
                target = _resolve(n, known)
                if target and target != mod:
                    found.append((target, child.lineno, in_function))
            visit(child, inner)
    visit(tree, False)
    return found


def unit(mod: str) -> int:
    """Index in LAYERS of the unit holding `mod`; a package's __main__ is an entry point, a
    command like those of moex.cli."""
    if mod.endswith(".__main__"):
        return LAYERS.index("moex.cli")
    best = None
    for i, u in enumerate(LAYERS):
        if mod == u or (mod.startswith(u + ".") and u != "moex"):
            if best is None or len(u) > len(LAYERS[best]):
                best = i
    if best is None:
        raise KeyError(f"module {mod} is in no unit of LAYERS; add its package there")
    return best


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def largest_functions(known: dict, n: int = 10) -> list[tuple[int, str]]:
    sizes = []
    for mod, path in known.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                sizes.append((node.end_lineno - node.lineno + 1, f"{mod}:{node.name}"))
    return sorted(sizes, reverse=True)[:n]


def analyse(root: pathlib.Path = ROOT) -> dict:
    known = modules(root)
    graph, upward, local = {}, [], 0
    for mod, path in known.items():
        edges = imports(mod, path, known)
        graph[mod] = {t for t, _, _ in edges}
        local += len({line for _, line, inner in edges if inner})    # statements, not names
        for target, line, _ in edges:
            if unit(target) > unit(mod):
                upward.append(f"{mod}:{line} imports {target}")
    return {"modules": len(known), "cycles": cycles(graph), "upward": sorted(set(upward)),
            "function_level_imports": local, "largest": largest_functions(known)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="exit 1 on a cycle or upward import")
    p.add_argument("--root", default=str(ROOT))
    args = p.parse_args(argv)
    r = analyse(pathlib.Path(args.root))
    print(f"modules: {r['modules']}")
    print(f"function-level import statements of package modules: "
          f"{r['function_level_imports']}")
    print(f"import cycles: {len(r['cycles'])}")
    for c in r["cycles"]:
        print("  " + " <-> ".join(c))
    print(f"upward imports: {len(r['upward'])}")
    for u in r["upward"]:
        print("  " + u)
    print("largest functions (lines):")
    for size, name in r["largest"]:
        print(f"  {size:4d}  {name}")
    return 1 if args.check and (r["cycles"] or r["upward"]) else 0


if __name__ == "__main__":
    sys.exit(main())
