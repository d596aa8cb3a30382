"""The shape of the package's code, measured the same way before and after a renovation (issue 27's counts).

    python benchmarks/code_shape.py [--root CHECKOUT] [--top 10]

Prints: the longest functions (lines from `def` to the last line of the body, decorators excluded), how many are
over 60 and 80 lines, the files over 300 lines, the top-level fields of `TrainConfig`, the comparisons of the
objective's name (`objective == "grpo"`, `objective != ...`, `... in OBJECTIVES` outside the objectives' registry
module) and the strings that name package code ("mixgrpo.x:attr"). Reads the source only (ast); imports nothing.
"""

from __future__ import annotations

import argparse
import ast
import re
from pathlib import Path

DOTTED = re.compile(r"mixgrpo(\.\w+)+:\w+")


def _functions(tree: ast.AST, prefix: str = ""):
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield f"{prefix}{node.name}", node.end_lineno - node.lineno + 1
            yield from _functions(node, f"{prefix}{node.name}.")
        elif isinstance(node, ast.ClassDef):
            yield from _functions(node, f"{prefix}{node.name}.")
        else:
            yield from _functions(node, prefix)


def _is_objective(node: ast.AST) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "objective") or (
        isinstance(node, ast.Name) and node.id == "objective")


def _objective_comparisons(tree: ast.AST) -> int:
    """Comparisons of an `objective` name or attribute with a string constant or membership tests in a collection
    of names (`objective in OBJECTIVES`)."""
    count = 0
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(_is_objective(s) for s in sides) and any(
                    (isinstance(s, ast.Constant) and isinstance(s.value, str))
                    or (isinstance(s, ast.Name) and s.id == "OBJECTIVES") for s in sides):
                count += 1
    return count


def measure(root: Path, top: int) -> dict:
    package = root / "mixgrpo"
    functions, long_files, comparisons, dotted = [], [], {}, []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        text = path.read_text(encoding="utf-8")
        tree = ast.parse(text)
        lines = len(text.splitlines())
        if lines > 300:
            long_files.append((rel, lines))
        functions += [(n, f"{rel}:{name}") for name, n in _functions(tree)]
        if rel != "mixgrpo/objectives.py":
            found = _objective_comparisons(tree)
            if found:
                comparisons[rel] = found
        dotted += [f"{rel}: {node.value}" for node in ast.walk(tree)
                   if isinstance(node, ast.Constant) and isinstance(node.value, str) and DOTTED.fullmatch(node.value)]
    config = ast.parse((package / "config.py").read_text(encoding="utf-8"))
    train_config = next(n for n in ast.walk(config) if isinstance(n, ast.ClassDef) and n.name == "TrainConfig")
    fields = [n.target.id for n in train_config.body if isinstance(n, ast.AnnAssign)]
    functions.sort(reverse=True)
    return {"longest": functions[:top], "over_60": sum(n > 60 for n, _ in functions),
            "over_80": sum(n > 80 for n, _ in functions), "files_over_300": sorted(long_files, key=lambda f: -f[1]),
            "config_fields": len(fields), "objective_comparisons": comparisons, "dotted_strings": dotted}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default=str(Path(__file__).resolve().parent.parent), help="a checkout")
    parser.add_argument("--top", type=int, default=10)
    args = parser.parse_args()
    m = measure(Path(args.root), args.top)
    print("longest functions (lines):")
    for n, where in m["longest"]:
        print(f"  {n:4d}  {where}")
    print(f"functions over 60 lines: {m['over_60']}, over 80: {m['over_80']}")
    print("files over 300 lines: " + ", ".join(f"{f} ({n})" for f, n in m["files_over_300"]))
    print(f"TrainConfig top-level fields: {m['config_fields']}")
    total = sum(m["objective_comparisons"].values())
    print(f"comparisons of the objective's name outside its registry: {total} "
          + str(m["objective_comparisons"]))
    print(f"strings naming package code: {len(m['dotted_strings'])} {m['dotted_strings']}")


if __name__ == "__main__":
    main()
