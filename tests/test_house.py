"""The house rules that import-linter cannot see: outside ``ivtlr/backbones/`` no code names a model family or reads a
family's processor keys (the demo, the benchmarks and the opt-in testing package are built on the library, not part
of it)."""
from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "ivtlr"
OUTSIDE_THE_LIBRARY = ("backbones", "demo", "testing", "bench")
FAMILY_WORDS = re.compile(r"qwen|chameleon|internvl|llava|image_grid_thw|image_sizes|deepstack", re.IGNORECASE)
#: The default hub id of a config (a value, not a branch): the one place a family is named on purpose.
ALLOWED = {("config.py", "Qwen/Qwen2-VL-7B-Instruct")}


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the docstring nodes (words in prose are fine)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def family_words_in_code(path: Path, root: Path = PACKAGE) -> list[str]:
    tree = ast.parse(path.read_text())
    docstrings = _docstrings(tree)
    words = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            text = node.value
        elif isinstance(node, ast.Name):
            text = node.id
        elif isinstance(node, ast.Attribute):
            text = node.attr
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.arg)):
            text = getattr(node, "name", None) or getattr(node, "arg", "")
        else:
            continue
        relative = path.relative_to(root).as_posix()
        if FAMILY_WORDS.search(text) and (relative, text) not in ALLOWED:
            words.append(f"{relative}:{getattr(node, 'lineno', '?')}: {text!r}")
    return words


def library_files() -> list[Path]:
    return [path for path in sorted(PACKAGE.rglob("*.py"))
            if path.relative_to(PACKAGE).parts[0] not in OUTSIDE_THE_LIBRARY]


def test_only_backbones_name_a_model_family():
    assert len(library_files()) > 20
    found = [word for path in library_files() for word in family_words_in_code(path)]
    assert found == []


def test_the_check_sees_a_family_named_in_code(tmp_path):
    """The scan finds a branch on a family and a family's processor key, and ignores the words in a docstring."""
    planted = tmp_path / "planted.py"
    planted.write_text('"""Works with Qwen."""\nif model_type == "chameleon":\n    grid = inputs["image_grid_thw"]\n')
    assert len(family_words_in_code(planted, root=tmp_path)) == 2
