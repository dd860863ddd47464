"""Every package that jaxtok imports, at module level or inside a function, is a declared dependency.

A test venv has torch, which pulls in packages (jinja2, for one) that jaxtok needs too, so importing jaxtok here
cannot see a missing declaration. Reading the imports from the source can: every top-level module named in an
`import` of jaxtok/ or of the scripts a user runs must be the standard library, jaxtok itself, a package in
pyproject.toml's `dependencies`, or one of the optional imports listed below with the reason it is optional.
CI also runs the README's first command in a venv without torch and imports every module there (.ci/run).
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[1]
# benchmark.py compares with torch and needs the test extra
USER_SCRIPTS = ("train.py", "eval.py", "export.py", "compare.py")

# Imports a user never reaches without asking for them.
OPTIONAL = {
    "torch": "hf_io reads pytorch_model.bin only with model.allow_pickle=True, and says to install torch; "
             "compare.py --frameworks peft (the peft extra)",
    "peft": "compare.py --frameworks peft only, which says to install the peft extra when it is missing",
}


def imported_modules(path: Path) -> set[str]:
    """Top-level names of every absolute import in a file, wherever in the file it stands."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def declared_distributions() -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return {normalize(re.split(r"[\s<>=!~\[;]", req, maxsplit=1)[0]) for req in project["dependencies"]}


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_import_of_jaxtok_is_declared():
    files = sorted((REPO / "jaxtok").rglob("*.py")) + [REPO / "scripts" / s for s in USER_SCRIPTS]
    modules = set().union(*(imported_modules(f) for f in files))
    third_party = sorted(m for m in modules if m not in sys.stdlib_module_names and m not in ("jaxtok", "__future__"))
    distributions = importlib.metadata.packages_distributions()
    declared = declared_distributions()
    undeclared = {}
    for module in third_party:
        if module in OPTIONAL:
            continue
        providers = {normalize(d) for d in distributions.get(module, [module])}
        if not providers & declared:
            undeclared[module] = sorted(providers)
    assert not undeclared, f"imported by jaxtok but not in pyproject.toml's dependencies: {undeclared}"


def test_the_check_sees_a_missing_declaration(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("import os\n\ndef f():\n    import jinja2.sandbox\n    from yaml import safe_load\n")
    assert imported_modules(source) == {"os", "jinja2", "yaml"}
    assert "jinja2" in declared_distributions()
