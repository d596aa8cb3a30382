"""Imports point one way (docs/design.md, module map): read from the source, every import statement counts,
the ones inside functions included (only `if TYPE_CHECKING:` blocks, which never run, are left out)."""

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "mixgrpo"

MATH = {"mixgrpo.sampling", "mixgrpo.plan", "mixgrpo.grpo", "mixgrpo.flow_matching", "mixgrpo.seeding"}
COMMANDS = {"mixgrpo.__main__", "mixgrpo.preprocess", "mixgrpo.pretrain", "mixgrpo.configdoc", "mixgrpo.launch"}
BELOW_MODELS = {"mixgrpo.registry", "mixgrpo.dtypes", "mixgrpo.fileio", "mixgrpo.progress", "mixgrpo.dist",
                "mixgrpo.packages", "mixgrpo.errors"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(f): f for f in PACKAGE.rglob("*.py")}
COMMANDS |= {m for m in MODULES if m == "mixgrpo.cli" or m.startswith("mixgrpo.cli.")}  # the CLI package


def _statements(tree: ast.AST, top_level_only: bool = False):
    """Import statements of a module, skipping `if TYPE_CHECKING:` blocks (and, with top_level_only, anything
    inside a function, a class or a try block: imports that run only when called, or that may fail)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif not top_level_only or not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef,
                                                          ast.Try, ast.Lambda)):
            yield from _statements(node, top_level_only)


def _imported(name: str, top_level_only: bool = False) -> set[str]:
    """Full names of what module `name` imports ("mixgrpo.models.base", "torch.distributed", "scipy", ...)."""
    out = set()
    for node in _statements(ast.parse(MODULES[name].read_text(encoding="utf-8")), top_level_only):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
            continue
        base = node.module or ""
        if node.level:  # relative: from the module's package
            package = name.split(".") if MODULES[name].name == "__init__.py" else name.split(".")[:-1]
            base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
        for a in node.names:  # `from mixgrpo import dist` imports the module mixgrpo.dist
            out.add(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base)
    return out


GRAPH = {name: {m for m in _imported(name) if m in MODULES and m != name} for name in MODULES}


def _reachable(name: str) -> set[str]:
    seen, todo = set(), [name]
    while todo:
        for m in GRAPH[todo.pop()] - seen:
            seen.add(m)
            todo.append(m)
    return seen


def test_the_package_has_no_import_cycle():
    cycles = [f"{a} <-> {b}" for a in GRAPH for b in _reachable(a) if a < b and a in _reachable(b)]
    assert cycles == []


def test_the_math_imports_nothing_above_it():
    for name in MATH:
        package = {m for m in _imported(name) if m.startswith("mixgrpo")}
        assert package <= MATH, f"{name} imports {sorted(package - MATH)}"
        third_party = {m.split(".")[0] for m in _imported(name)} - set(sys.stdlib_module_names) - {"mixgrpo"}
        assert third_party <= {"torch", "numpy"}, f"{name} imports {sorted(third_party)}"
        assert not any(m.startswith("torch.distributed") for m in _imported(name)), name


def test_models_import_no_command_and_nothing_above_them():
    for name in (m for m in MODULES if m.startswith("mixgrpo.models")):
        above = {m for m in _reachable(name) if not m.startswith("mixgrpo.models")} - BELOW_MODELS
        assert above == set(), f"{name} reaches {sorted(above)}"
    assert not any(_reachable(m) & COMMANDS for m in MODULES if m not in COMMANDS)  # only commands reach commands


def test_nothing_in_the_package_imports_benchmarks_or_tests():
    theirs = {f.stem for d in ("benchmarks", "tests") for f in (ROOT / d).glob("*.py")} | {"benchmarks", "tests"}
    for name in MODULES:
        assert not {m.split(".")[0] for m in _imported(name)} & theirs, name


def test_what_the_package_imports_at_load_time_is_a_declared_dependency():
    """A plain `pip install mixgrpo` must import every module; optional packages load inside functions."""
    declared = {re.split(r"[<>=!~\[ ;]", r)[0].lower() for r in importlib.metadata.requires("mixgrpo")
                if "extra ==" not in r}  # the core dependencies of pyproject.toml
    distributions = importlib.metadata.packages_distributions()
    for name in MODULES:
        for top in {m.split(".")[0] for m in _imported(name, top_level_only=True)} - set(sys.stdlib_module_names):
            if top == "mixgrpo":
                continue
            assert {d.lower() for d in distributions.get(top, [top])} & declared, f"{name} imports {top}"


def _module_map() -> list[set[str]]:
    """The rows of docs/design.md's module map, as sets of module names (a folder: every module in it)."""
    rows = []
    for line in (ROOT / "docs" / "design.md").read_text(encoding="utf-8").splitlines():
        if line.startswith("| `mixgrpo/"):
            paths = re.findall(r"`(mixgrpo/[\w/.]*)`", line.split("|")[1])
            rows.append({m for p in paths for m in MODULES if m.replace(".", "/") + ".py" == p
                         or (p.endswith("/") and m.startswith(p[:-1].replace("/", ".")))})
    return rows


def test_the_module_map_of_design_md_is_the_import_order():
    """Every module is in one row of the map, and imports only modules of its row or of the rows above it."""
    rows = _module_map()
    row_of = {m: i for i, row in enumerate(rows) for m in row}
    unmapped = set(MODULES) - {"mixgrpo"} - set(row_of)
    assert unmapped == set(), f"docs/design.md's module map lacks {sorted(unmapped)}"
    assert sum(len(r) for r in rows) == len(row_of), "a module is in two rows"
    upward = [f"{m} -> {n}" for m in row_of for n in GRAPH[m] if n in row_of and row_of[n] > row_of[m]]
    assert upward == [], "imports from a row below: " + ", ".join(upward)


def _string_constants(name: str) -> list[str]:
    return [node.value for node in ast.walk(ast.parse(MODULES[name].read_text(encoding="utf-8")))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)]


def test_no_string_names_package_code():
    """Package code is reached by import statements (which the tests above see), never by a "mixgrpo.x:attr" string
    resolved with importlib; only the registry resolves "package.module:attribute" names, from user configs."""
    dotted = re.compile(r"mixgrpo(\.\w+)+:\w+")
    for name in MODULES:
        assert not [s for s in _string_constants(name) if dotted.fullmatch(s.strip())], name


REGISTRATION = re.compile(r"^MODELS\.add\(ModelSpec\(", re.MULTILINE)


def test_each_base_model_is_one_file_registered_by_one_import():
    """Every model description (`ModelSpec`) is registered at the foot of the file that defines its factory, and
    that file is imported by mixgrpo/models/__init__.py: a new model is one file and one import line."""
    from mixgrpo.models import MODELS

    imported = {m for m in _imported("mixgrpo.models") if m.startswith("mixgrpo.models.")}
    for spec in MODELS.specs():
        home = spec.factory.__module__
        assert REGISTRATION.search(MODULES[home].read_text(encoding="utf-8")), spec.name
        assert home in imported, f"mixgrpo/models/__init__.py does not import {home} ({spec.name!r})"
        hooks = (spec.text_encoder, spec.check, spec.trained_sigma_check, spec.lora_format)
        assert all(h.__module__.startswith("mixgrpo.models.") for h in hooks if h is not None), spec.name
    registering = {m for m in MODULES if REGISTRATION.search(MODULES[m].read_text(encoding="utf-8"))}
    assert registering == {s.factory.__module__ for s in MODELS.specs()} <= imported


def test_training_against_a_reward_server_needs_no_web_framework_and_serving_names_what_to_install(tmp_path):
    """FastAPI and uvicorn (the `serve` extra) are imported by `mixgrpo serve-rewards` only: with both blocked, the
    trainer and the client import, and the command says what to install in one line."""
    import subprocess

    code = ("import sys\nsys.modules['fastapi'] = sys.modules['uvicorn'] = None\n"
            "import mixgrpo.train, mixgrpo.rewards.remote, mixgrpo.preflight, mixgrpo.cli\n"
            "sys.exit(mixgrpo.cli.main(['serve-rewards', '--reward', 'verifier']))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert "needs fastapi and uvicorn (the 'serve' extra): pip install 'fastapi" in done.stderr
