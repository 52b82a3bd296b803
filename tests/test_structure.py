"""Import rules between the layers (issue 10), checked on the source with ``ast``.

The command line is the top layer, which nothing imports: no module imports
``dynamics.cli`` or ``llm_probes.cli``, except ``dynamics/cli.py`` (the ``prefdyn``
entry point) importing ``llm_probes/cli.py`` for the probe sub-commands; the tests
may import both. The computing layers below know nothing of figures or real-LLM
probes: no module of ``dynamics/`` (but its CLI) or of ``synthetic/`` imports
``figures`` or ``llm_probes``; what they need (e.g. the valid figure names of a
sweep) is passed in by the CLI.

Every ``import`` and ``from ... import`` counts, wherever it stands (module level,
inside a function, under ``if``), relative imports resolved, and so does
``importlib.import_module("...")`` or ``__import__("...")`` with a literal name.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("synthetic", "dynamics", "llm_probes", "figures", "benchmarks")
"""Directories whose modules are checked (every ``*.py`` below them; not ``tests``)."""
TOP = "dynamics.cli"
"""The ``prefdyn`` entry point (``[project.scripts]``), the only module above the rest."""
PROBE_CLI = "llm_probes.cli"
LOWER = ("dynamics", "synthetic")
"""Packages whose modules (but :data:`TOP`) import neither of :data:`HIGHER`."""
HIGHER = ("figures", "llm_probes")


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def module_name(path: Path) -> str:
    """``dynamics/cli.py`` → ``dynamics.cli``; ``figures/__init__.py`` → ``figures``."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_names(source: str, module: str, *, package: bool = False) -> set[str]:
    """Every module name ``source`` (the text of ``module``) may import.

    ``from A import b`` yields ``A`` and ``A.b`` (``b`` may be a submodule);
    relative imports are resolved against ``module`` (a package's ``__init__``
    when ``package``). Over-approximates, never misses a literal import."""
    names: set[str] = set()
    here = module.split(".") if package else module.split(".")[:-1]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = here[:len(here) - node.level + 1]  # level 1: this package
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            arg = node.args[0]
            if (called in ("import_module", "__import__") and isinstance(arg, ast.Constant)
                    and isinstance(arg.value, str)):
                names.add(arg.value)
    return names


def violations(module: str, imports: set[str]) -> list[str]:
    """The imports of ``module`` that break the layering, each as ``"A imports B"``."""
    found = []
    for name in sorted(imports):
        if _within(name, TOP):
            found.append(f"{module} imports {name}: nothing imports the prefdyn CLI")
        elif _within(name, PROBE_CLI) and module != TOP:
            found.append(f"{module} imports {name}: only {TOP} imports the probe CLI")
        elif (module != TOP and any(_within(module, p) for p in LOWER)
              and any(_within(name, p) for p in HIGHER)):
            found.append(f"{module} imports {name}: {', '.join(LOWER)} must not import "
                         f"{' or '.join(HIGHER)} (pass what is needed in from the CLI)")
    return found


def project_modules() -> dict[str, set[str]]:
    """Module name → what it imports, for every module under :data:`SOURCES`."""
    modules = {}
    for directory in SOURCES:
        for path in sorted((ROOT / directory).rglob("*.py")):
            name = module_name(path)
            modules[name] = imported_names(path.read_text(encoding="utf-8"), name,
                                           package=path.name == "__init__.py")
    return modules


def test_the_layers_hold():
    modules = project_modules()
    assert {TOP, PROBE_CLI, "dynamics.sweep", "dynamics.io", "synthetic.validation",
            "llm_probes.finetune", "figures"} <= set(modules)  # the walk found the tree
    broken = [v for module, imports in modules.items() for v in violations(module, imports)]
    assert broken == [], "\n".join(broken)


def test_the_entry_point_is_the_only_importer_of_the_probe_cli():
    modules = project_modules()
    assert PROBE_CLI in modules[TOP]  # a function-local import, seen by the walk
    assert [m for m, imports in modules.items() if PROBE_CLI in imports] == [TOP]
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert f'prefdyn = "{TOP}:main"' in pyproject


@pytest.mark.parametrize("module, source", [
    ("llm_probes.features", "def run(ctx):\n    from llm_probes.cli import write_atomic\n"),
    ("llm_probes.cli", "def main(argv):\n    from dynamics.cli import main\n"),
    ("llm_probes.finetune", "from . import cli\n"),
    ("figures.style", "from dynamics import cli\n"),
    ("benchmarks.bench_probes", "import dynamics.cli as prefdyn\n"),
    ("dynamics.sweep", "def load_plan():\n    if True:\n        from figures import FIGURES\n"),
    ("dynamics.experiment", "import importlib\nimportlib.import_module('llm_probes.model')\n"),
    ("dynamics", "from .cli import main\n"),
    ("synthetic.problem", "from figures.style import plt\n"),
    ("synthetic.validation", "__import__('llm_probes')\n"),
])
def test_the_check_catches_a_forbidden_import(module, source):
    imports = imported_names(source, module, package="." not in module)
    assert violations(module, imports), f"{module}: {source!r} was not caught"


@pytest.mark.parametrize("module, source", [
    (TOP, "def _parser():\n    from llm_probes.cli import add_probe_parser\n"),
    (TOP, "from figures import FIGURES\nfrom dynamics.sweep import load_plan\n"),
    ("llm_probes.features", "def run(ctx):\n    from figures.probe_features import plot\n"),
    ("llm_probes.finetune", "from dynamics.io import write_json\n"),
    ("figures.priority", "from dynamics.config import build_problem\n"),
    ("dynamics.sweep", "from dynamics.config import SCHEMA\nfrom .io import atomic_write\n"),
])
def test_the_check_allows_the_layering(module, source):
    assert violations(module, imported_names(source, module)) == []
