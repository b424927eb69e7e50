"""The repository code that a stage's command runs, read from the imports of its module.

A DVC stage must depend on every file its command runs, or a code change leaves DVC serving
stale outputs; a checkpoint must belong to the code that wrote it. Both come from here:
tests/test_dvc_yaml.py checks each stage's deps in dvc.yaml against `code_files`, and
`code_digest` keys the checkpoints.
"""

import ast
import hashlib
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
ROOT = PACKAGE.parent


def _module_path(name: str) -> Path | None:
    """The file of module `name` inside this package, or None for an outside module."""
    if name != PACKAGE.name and not name.startswith(PACKAGE.name + "."):
        return None
    path = ROOT.joinpath(*name.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _imports(path: Path, name: str) -> set[str]:
    """Modules that the file of module `name` imports (absolute names; `from a import b` gives
    both a and a.b, since b may be a submodule)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def code_files(module: str) -> list[Path]:
    """Every file of this package that `python -m module` runs: the modules it imports,
    transitively (with their packages' __init__.py), and all non-Python files of a subpackage
    it imports (compiled sources such as `fast/kernels.cpp`)."""
    seen: set[Path] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        for prefix in _prefixes(name):
            path = _module_path(prefix)
            if path is None or not path.is_file() or path in seen:
                continue
            seen.add(path)
            todo.extend(_imports(path, prefix))
            if path.name == "__init__.py" and path.parent != PACKAGE:
                seen.update(p for p in path.parent.iterdir() if p.suffix not in (".py", ".pyc"))
    return sorted(seen)


def _prefixes(name: str) -> list[str]:
    """a.b.c -> [a, a.b, a.b.c]: importing a module runs its packages' __init__ first."""
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def code_digest(module: str) -> str:
    digest = hashlib.sha256()
    for path in code_files(module):
        digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()
