"""The map stays true: imports only point down the layers, and docs/architecture.md names every top-level module.

Layers, lowest first: `errors` < `config` < `loss` < `model` < `data` < `run` < `zero_shot` < `training` < the
commands (every other top-level module: `cli`, `__main__`, `pretrain`, `finetune`, ...). A module may import its
own package and any lower layer; the commands may import anything, each other included. `import lmpipe` alone (for
`__version__`) is allowed anywhere; `lmpipe/__init__.py` itself imports nothing of lmpipe, since every
`import lmpipe.X` runs it first.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "src" / "lmpipe"
LAYERS = ["errors", "config", "loss", "model", "data", "run", "zero_shot", "training"]
COMMANDS = len(LAYERS)  # the layer of every other top-level module
ROOT = -1  # lmpipe/__init__.py: below everything



def top_level(path: Path, root: Path = PACKAGE) -> str:
    """`config` for src/lmpipe/config/recipe.py, `cli` for src/lmpipe/cli.py, `__init__` for src/lmpipe/__init__.py."""
    parts = path.relative_to(root).parts
    return parts[0] if len(parts) > 1 else path.stem


def layer(name: str) -> int:
    if name == "__init__":
        return ROOT
    return LAYERS.index(name) if name in LAYERS else COMMANDS


def imported_lmpipe_names(path: Path, root: Path = PACKAGE) -> list[tuple[int, str]]:
    """(line, top-level name under lmpipe) for every import of lmpipe code in the file, at any depth (the code
    imports lazily inside functions); relative imports resolved against the file's package. A bare `import lmpipe`
    or `from lmpipe import __version__` yields nothing."""
    package = list(path.relative_to(root.parent).parts[:-1])  # the file's package: ['lmpipe', 'config']
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            modules = [alias.name.split(".") for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module.split(".") if node.module else []
            if node.level:  # `from . import x`: the file's package; each further dot one package up
                base = package[: len(package) - node.level + 1] + base
            # `from lmpipe import x` / `from . import x`: x may be a module, e.g. `from lmpipe.zero_shot import tasks`
            modules = [base + [alias.name] if len(base) == 1 else base for alias in node.names]
        else:
            continue
        for parts in modules:
            if parts[0] == "lmpipe" and len(parts) > 1 and not parts[1].startswith("__"):
                found.append((node.lineno, parts[1]))
    return found


def violations(root: Path = PACKAGE) -> list[tuple[str, int, str]]:
    """(file relative to src/lmpipe, line, imported top-level name) for each import of a higher layer."""
    found = []
    for path in sorted(root.rglob("*.py")):
        own = top_level(path, root)
        if layer(own) == COMMANDS:
            continue
        for line, target in imported_lmpipe_names(path, root):
            if target != own and (layer(target) > layer(own) or own == "__init__"):
                found.append((path.relative_to(root).as_posix(), line, target))
    return sorted(found)


def test_imports_point_down_the_layers():
    found = violations()
    assert not found, "imports of a higher layer (order: " + " < ".join([*LAYERS, "commands"]) + "):\n" + "\n".join(
        f"  src/lmpipe/{file}:{line} -> lmpipe.{target}" for file, line, target in found
    )


def test_the_import_scan_sees_lazy_relative_and_from_package_imports(tmp_path):
    """The scanner itself: an import inside a function, a relative one and `from lmpipe.X import module` count."""
    package = tmp_path / "lmpipe"
    (package / "data").mkdir(parents=True)
    source = package / "data" / "example.py"
    source.write_text(
        "import lmpipe\nfrom lmpipe import __version__\nfrom lmpipe.errors import LmpipeError\n"
        "def f():\n    from lmpipe.training.trainer import build_trainer\n"
        "    from ..run import files\n    from . import packing\n    import lmpipe.zero_shot.run\n"
        "from lmpipe import cli\n"
    )
    assert sorted(imported_lmpipe_names(source, package)) == [
        (3, "errors"), (5, "training"), (6, "run"), (7, "data"), (8, "zero_shot"), (9, "cli")
    ]
    assert violations(package) == [
        ("data/example.py", line, target)
        for line, target in ((5, "training"), (6, "run"), (8, "zero_shot"), (9, "cli"))
    ]


def test_the_architecture_map_names_every_top_level_module_and_package():
    """docs/architecture.md names each `*.py` directly in src/lmpipe and each sub-package (`config/`) in backticks."""
    text = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    named = set(re.findall(r"`([^`\s]+)`", text))
    modules = {path.name for path in PACKAGE.glob("*.py")}
    packages = {f"{path.parent.name}/" for path in PACKAGE.glob("*/__init__.py")}
    missing = sorted(name for name in modules | packages if name not in named)
    assert not missing, f"docs/architecture.md does not name (in backticks): {', '.join(missing)}"
