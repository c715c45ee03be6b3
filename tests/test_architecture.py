"""Dependencies point one way: students <- teachers <- distill <- distill.downstream; `resources` is usable by
all and imports none of them. Only the entry point (distill/run.py) reaches up, to dispatch fine-tuning."""

import ast

import pytest

from tests.cli import ROOT

# package -> the packages it may import (besides itself)
ALLOWED = {
    "resources": set(),
    "students": {"resources"},
    "teachers": {"resources", "students"},
    "distill": {"resources", "students", "teachers"},
    "distill.downstream": {"resources", "students", "teachers", "distill"},
}
ENTRY_POINTS = {"distill/run.py"}


def group(module: str) -> str | None:
    if module == "distill.downstream" or module.startswith("distill.downstream."):
        return "distill.downstream"
    top = module.split(".")[0]
    return top if top in ALLOWED else None


def imports(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            yield from (f"{node.module}.{a.name}" for a in node.names)  # `from distill import downstream`
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names)


FILES = [ROOT / "resources.py", *(p for d in ("students", "teachers", "distill")
                                  for p in sorted((ROOT / d).rglob("*.py")))]


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_one_way(path):
    rel = path.relative_to(ROOT)
    own = group(".".join(rel.with_suffix("").parts))
    if str(rel) in ENTRY_POINTS:
        return
    wrong = sorted({m for m in imports(path) if group(m) not in (None, own) and group(m) not in ALLOWED[own]})
    assert not wrong, f"{rel} ({own}) imports {wrong}"


def test_the_check_sees_a_wrong_import(tmp_path):
    bad = tmp_path / "x.py"
    bad.write_text("from distill.downstream import report\nimport teachers.teacher\n")
    assert {group(m) for m in imports(bad)} >= {"distill.downstream", "teachers"}
