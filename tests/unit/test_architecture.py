"""The package layering of docs/architecture.md, checked on the import graph of every source file
(module-level and function-level imports alike), so it stays true."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "cosytune"

#: package -> the cosytune packages it may import (besides itself). Keep in step with docs/architecture.md.
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "fileio": {"errors"},
    "console": set(),
    "audio": {"errors", "fileio"},
    "text": {"errors", "fileio"},
    "config": {"errors", "fileio"},
    "models": {"errors"},
    "ranks": set(),
    "weights": {"errors", "fileio", "models"},
    "modeldir": {"errors", "fileio", "models", "weights", "text", "config"},
    "data": {"errors", "fileio", "console", "audio", "text", "config", "modeldir", "weights"},
    "train": {"errors", "fileio", "console", "audio", "text", "config", "models", "modeldir", "weights", "data",
              "ranks"},
    "infer": {"errors", "fileio", "console", "audio", "text", "config", "models", "modeldir", "weights", "ranks"},
    "steps": {"errors", "fileio", "console", "audio", "text", "config", "models", "modeldir", "weights",
              "data", "train", "infer", "ranks"},
    "pipeline": {"errors", "fileio", "console", "audio", "text", "config", "models", "modeldir", "weights",
                 "data", "train", "infer", "steps", "evaluation", "ranks"},
    "evaluation": {"errors", "fileio", "console", "audio", "text", "config", "models", "modeldir", "weights",
                   "data", "train", "infer", "steps", "ranks"},
    "serve": {"errors", "fileio", "console", "audio", "text", "config", "models", "modeldir", "weights",
              "data", "train", "infer", "steps", "pipeline", "evaluation", "ranks"},
    "cli": {"*"},
    "__main__": {"cli"},
    "__init__": set(),
}


def _package_of(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported cosytune package) for every import statement in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = ([node.module] if node.module != "cosytune"
                     else [f"cosytune.{a.name}" for a in node.names if a.name != "__version__"])
        for name in names:
            parts = name.split(".")
            if parts[0] == "cosytune" and len(parts) > 1:
                found.append((node.lineno, parts[1]))
    return found


def _violations() -> list[str]:
    bad = []
    for path in sorted(SRC.rglob("*.py")):
        pkg = _package_of(path)
        allowed = ALLOWED.get(pkg)
        if allowed is None:
            bad.append(f"{path.relative_to(SRC)}: package {pkg!r} is not in the layering table (add it, and to "
                       "docs/architecture.md)")
            continue
        for line, target in _imports(path):
            if target == pkg or "*" in allowed or target in allowed:
                continue
            bad.append(f"{path.relative_to(SRC)}:{line} ({pkg}) imports cosytune.{target}")
    return bad


def test_every_import_follows_the_layering():
    bad = _violations()
    assert not bad, "imports that break docs/architecture.md:\n  " + "\n  ".join(bad)


@pytest.mark.parametrize("rule, pkg, target", [
    ("networks know nothing of files, CLI, training or serving", "models",
     {"modeldir", "weights", "cli", "train", "infer", "data", "pipeline", "fileio"}),
    ("nothing outside cli/ imports cli/", "pipeline", {"cli"}),
    ("inference imports nothing from data preparation", "infer", {"data"}),
])
def test_the_issue_rules_are_in_the_table(rule, pkg, target):
    assert not (ALLOWED[pkg] & target), rule
    assert all("cli" not in v and "*" not in v for k, v in ALLOWED.items() if k not in ("cli", "__main__")), rule


def test_the_checker_sees_function_level_imports(tmp_path):
    p = tmp_path / "m.py"
    p.write_text("def f():\n    from cosytune.cli.main import main\n    import cosytune.data.kaldi\n")
    assert _imports(p) == [(2, "cli"), (3, "data")]
