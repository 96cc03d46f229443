"""The package is layered and acyclic: each folder imports only from the layers below it (README "Layout")."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# package prefix -> layer; a module may import from a strictly lower layer or from its own package.
LAYERS = {
    "rhythm_kernels": 0,
    "rhythm.config": 1, "rhythm.models": 1,
    "rhythm.metrics": 2,
    "rhythm.credit": 3, "rhythm.capture": 3,
    "rhythm.scoring": 4,
    "rhythm.report": 5,
    "rhythm.app": 6, "rhythm.integrations": 6,
    "rhythm": 7, "rhythm.quickstart": 7,   # the public facade and the quickstart script
}

# Imports inside a function that point upward on purpose, with the reason (none: RhythmScores' notebook view is
# registered by the report layer, rhythm.scoring.scorer.set_notebook_view).
LAZY_UPWARD: dict[tuple[str, str], str] = {}


def _unit(module: str) -> str:
    """The LAYERS key a dotted module name belongs to (longest prefix)."""
    best = None
    for key in LAYERS:
        if module == key or module.startswith(key + "."):
            if best is None or len(key) > len(best):
                best = key
    assert best is not None, module
    return best


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "kernels":
        parts[0] = "rhythm_kernels"
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_module(dotted: str) -> bool:
    parts = dotted.split(".")
    folder = {"rhythm": "rhythm", "rhythm_kernels": "kernels"}.get(parts[0])
    if folder is None:
        return False
    path = ROOT.joinpath(folder, *parts[1:])
    return path.is_dir() or path.with_suffix(".py").exists()


def _imports(path: Path, module: str):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module
            for alias in node.names:   # `from rhythm import config` imports the module rhythm.config
                sub = f"{name}.{alias.name}"
                yield node.lineno, sub if _is_module(sub) else name


def _sources():
    for folder in ("rhythm", "kernels"):
        yield from sorted((ROOT / folder).rglob("*.py"))


def test_every_import_points_down():
    bad = []
    for path in _sources():
        module = _module_name(path)
        own = _unit(module)
        for line, target in _imports(path, module):
            if not (target == "rhythm" or target.startswith(("rhythm.", "rhythm_kernels"))):
                continue
            other = _unit(target)
            if other == own or (module, target) in LAZY_UPWARD:
                continue
            if LAYERS[other] >= LAYERS[own]:
                bad.append(f"{path.relative_to(ROOT)}:{line}: {module} ({own}, layer {LAYERS[own]}) imports "
                           f"{target} ({other}, layer {LAYERS[other]})")
    assert not bad, "imports that point sideways or upward:\n" + "\n".join(bad)


def test_the_checker_sees_a_planted_upward_import(tmp_path):
    # the walk above must find an upward import when one exists (a checker that sees nothing passes vacuously)
    src = tmp_path / "m.py"
    src.write_text("from rhythm.scoring.scorer import RhythmScorer\nimport rhythm.app.cli\n")
    found = [t for _, t in _imports(src, "rhythm.metrics.m")]
    assert found == ["rhythm.scoring.scorer", "rhythm.app.cli"]
    assert LAYERS[_unit(found[0])] > LAYERS[_unit("rhythm.metrics.attention")]
