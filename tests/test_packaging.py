"""The package declares what it imports: every third-party module that
`src/dpsynth` imports comes from a distribution listed in pyproject.toml's
dependencies, so `pip install .` alone gives a working dpsynth."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _declared() -> set[str]:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return {re.split(r"[\[<>=!~; ]", d, maxsplit=1)[0].lower().replace("_", "-")
            for d in deps}


def _imported() -> dict[str, str]:
    """Top-level third-party module -> a file importing it."""
    found: dict[str, str] = {}
    for path in sorted((REPO / "src" / "dpsynth").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.module
                     and not node.level else [])
            for name in names:
                top = name.split(".")[0]
                if top != "dpsynth" and top not in sys.stdlib_module_names:
                    found.setdefault(top, str(path.relative_to(REPO)))
    return found


def _undeclared(declared: set[str]) -> dict[str, tuple[list[str], str]]:
    """Imported modules whose distributions are none of `declared`."""
    dists = packages_distributions()
    undeclared = {}
    for module, where in _imported().items():
        providers = {d.lower().replace("_", "-") for d in dists.get(module, [module])}
        if not providers & declared:
            undeclared[module] = (sorted(providers), where)
    return undeclared


def test_every_third_party_import_is_a_declared_dependency() -> None:
    undeclared = _undeclared(_declared())
    assert not undeclared, f"imported but not in pyproject.toml dependencies: {undeclared}"


def test_the_check_sees_a_missing_dependency() -> None:
    # torch-fidelity (imported by dpsynth.eval) was once missing from pyproject.toml
    assert set(_undeclared(_declared() - {"torch-fidelity"})) == {"torch_fidelity"}
