"""Count the lines of the Python sources under a folder, per package: raw and code-only.

Raw lines are every line of every ``*.py`` file. Code-only lines leave out blank lines, comment-only
lines and the lines of docstrings (a string standing alone as the first statement of a module, class
or function), so that moving prose around does not change the figure.

    python scripts/count_lines.py [src/cosytune] [--rev REV]

With ``--rev`` the files are read from that git commit instead of the working tree, so the figure of
an earlier state can be reproduced exactly (e.g. ``--rev 0dad6c5``).
"""

from __future__ import annotations

import argparse
import ast
import io
import subprocess
import tokenize
from collections import defaultdict
from pathlib import Path

_NOT_CODE = {
    tokenize.COMMENT,
    tokenize.NL,
    tokenize.NEWLINE,
    tokenize.INDENT,
    tokenize.DEDENT,
    tokenize.ENDMARKER,
    tokenize.ENCODING,
}


def _docstring_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            first = node.body[0] if node.body else None
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                lines.update(range(first.lineno, first.end_lineno + 1))
    return lines


def count(source: str) -> tuple[int, int]:
    """(raw lines, code-only lines) of one Python source text."""
    raw = len(source.splitlines())
    docs = _docstring_lines(ast.parse(source))
    code: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type in _NOT_CODE:
            continue
        code.update(range(tok.start[0], tok.end[0] + 1))
    return raw, len(code - docs)


def _sources(root: str, rev: str | None) -> dict[str, str]:
    if rev is None:
        return {str(p): p.read_text(encoding="utf-8") for p in sorted(Path(root).rglob("*.py"))}
    names = subprocess.run(
        ["git", "ls-tree", "-r", "--name-only", rev, "--", root],
        check=True, capture_output=True, text=True,
    ).stdout.split()
    out = {}
    for name in sorted(n for n in names if n.endswith(".py")):
        out[name] = subprocess.run(
            ["git", "show", f"{rev}:{name}"], check=True, capture_output=True, text=True
        ).stdout
    return out


def _package(path: str, root: str) -> str:
    rel = Path(path).relative_to(root)
    return rel.parts[0] if len(rel.parts) > 1 else str(rel)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", nargs="?", default="src/cosytune")
    parser.add_argument("--rev", help="read the files from this git commit")
    args = parser.parse_args()
    root = args.root.rstrip("/")
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for path, text in _sources(root, args.rev).items():
        raw, code = count(text)
        entry = totals[_package(path, root)]
        entry[0] += raw
        entry[1] += code
    print(f"{'package':<16} {'raw':>7} {'code':>7}")
    for name in sorted(totals):
        raw, code = totals[name]
        print(f"{name:<16} {raw:>7} {code:>7}")
    print(f"{'total':<16} {sum(v[0] for v in totals.values()):>7} {sum(v[1] for v in totals.values()):>7}")


if __name__ == "__main__":
    main()
