"""The documentation points only at things the repository has.

For README.md, every docs/*.md and benchmarks/README.md: each relative markdown link must resolve to a file or folder
inside the repository, and each repository path written in backticks (a word with a ``/`` under one of the
repository's top-level folders, or a file name ending in a known extension) must exist. Placeholders (``<family>``,
``*.yaml``), URLs, hub ids and what the commands write (``ivtlr_demo/...``, ``probe.json``) are not repository paths.
Nothing may point outside the repository. Plain text only: no torch, no ivtlr import.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 250

#: A word in backticks ending like this names a file.
FILE_ENDINGS = (".py", ".md", ".yaml", ".yml", ".sh", ".json", ".toml", ".lock")
#: Folders and files that runs create, not the repository: the demo's report, run directories, the environment.
WRITTEN_PREFIXES = ("ivtlr_demo/", "runs/", "checkpoints/", "save_path/", ".venv/")
WRITTEN_NAMES = {"probe.json", "probe.md", "ivtlr.json", "config.yaml", "meta.json", "report.json", "report.md"}
#: Never in the documentation: places outside the repository, and design notes or issues that are not part of it.
OUTSIDE_REFERENCES = re.compile(r"\.\./shared|/work/|DESIGN\.md|DESIGN §|(?i:\bissues?\s*#\d+)")
SKIPPED_DIRS = {".git", ".venv", "__pycache__", ".pytest_cache", "node_modules"}
#: A code span that starts with one of these is an HTTP route of ``ivtlr serve`` (``GET /health``), not a path.
HTTP_METHODS = {"GET", "POST", "PUT", "DELETE"}

FENCE = re.compile(r"^\s*(```|~~~).*?^\s*\1[^\n]*$", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.DOTALL)
BRACES = re.compile(r"\{([^{}]*,[^{}]*)\}")


def documentation_files(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md")), root / "benchmarks" / "README.md"]


def _expand_braces(word: str) -> list[str]:
    """``scaling_{a,b}.json`` -> both names."""
    match = BRACES.search(word)
    if not match:
        return [word]
    return [expanded for option in match[1].split(",")
            for expanded in _expand_braces(word[:match.start()] + option + word[match.end():])]


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


def _repository_names(root: Path) -> set[str]:
    """Every file and folder name in the working tree (a bare file name must name one of them)."""
    names = set()
    for _, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in SKIPPED_DIRS]
        names.update(dirs)
        names.update(files)
    return names


def path_words(span: str) -> list[str]:
    """The words of a code span that name a repository path (placeholders, URLs, hub ids and routes left out)."""
    if span.split()[:1] and span.split()[0] in HTTP_METHODS:
        return []
    words = []
    for raw in span.replace("\\|", "|").split():
        word = raw.strip("\"'(),;:")
        if (not any(c.isalnum() for c in word) or any(mark in word for mark in "<>*|=") or "://" in word
                or word.startswith("-")):
            continue
        for expanded in _expand_braces(word):
            if expanded.startswith("./"):
                expanded = expanded[2:]
            if "/" in expanded or expanded.endswith(FILE_ENDINGS):
                words.append(expanded)
    return words


def problems(text: str, base: Path, root: Path = ROOT, names: set[str] | None = None) -> list[str]:
    """What in ``text`` (markdown whose relative links start at ``base``) does not exist in the repository at
    ``root``, or points outside it."""
    found = [f"refers outside the repository: {m[0]!r}" for m in OUTSIDE_REFERENCES.finditer(text)]
    prose = FENCE.sub("", text)
    for target in LINK.findall(prose):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.IGNORECASE) or target.startswith("#"):
            continue  # a URL, mailto: or an anchor on the same page
        path = base / target.split("#", 1)[0]
        if not _inside(path, root):
            found.append(f"link points outside the repository: {target}")
        elif not path.exists():
            found.append(f"link to a missing path: {target}")
    top_level = {entry.name for entry in root.iterdir()}
    for _, span in CODE_SPAN.findall(prose):
        for word in path_words(span):
            if word.startswith(WRITTEN_PREFIXES) or word in WRITTEN_NAMES:
                continue
            if word.startswith(("/", "~")) or not _inside(root / word, root):
                found.append(f"path outside the repository: {word}")
            elif "/" in word:
                if word.split("/", 1)[0] in top_level or word.endswith(FILE_ENDINGS):
                    if not (root / word).exists():
                        found.append(f"missing path: {word}")
            else:
                names = _repository_names(root) if names is None else names
                if word not in names:
                    found.append(f"no such file in the repository: {word}")
    return found


@pytest.fixture(scope="module")
def repository_names() -> set[str]:
    return _repository_names(ROOT)


@pytest.mark.parametrize("document", documentation_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_path_the_documentation_names_exists(document: Path, repository_names: set[str]):
    assert document.is_file(), f"{document.relative_to(ROOT)} is missing"
    found = problems(document.read_text(encoding="utf-8"), document.parent, ROOT, repository_names)
    assert found == [], f"{document.relative_to(ROOT)}:\n" + "\n".join(found)


def test_the_readme_is_a_front_door():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail into docs/"


def test_the_readme_links_every_page_of_docs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    linked = {target.split("#", 1)[0] for target in LINK.findall(FENCE.sub("", readme))}
    pages = [p.relative_to(ROOT).as_posix() for p in documentation_files()[1:]]
    assert len(pages) >= 3
    assert [page for page in pages if page not in linked] == []


def test_the_check_reports_what_is_missing(tmp_path):
    planted = tmp_path / "planted.md"
    planted.write_text(
        "A [missing page](docs/no_such_page.md), a [real one](docs/design.md) and "
        "[an anchor](#top), [a site](https://example.org/x.md).\n"
        "Paths: `src/ivtlr/no_such_module.py`, `src/ivtlr/cli.py`, `configs/no_such_config.yaml`, "
        "`ivtlr train configs/tiny_cpu.yaml`, `no_such_file.json`, `pyproject.toml`.\n"
        "Not paths: `src/ivtlr/backbones/<family>/`, `configs/accelerate/*.yaml`, `Qwen/Qwen2-VL-7B-Instruct`, "
        "`ivtlr_demo/report.md`, `probe.json`, `eval.batch_size=16`.\n"
        "Outside: `/etc/passwd`, `../outside.md`, [up](../../elsewhere.md), see ../shared/fixtures.\n"
        "```\nsrc/ivtlr/inside_a_code_block.py `src/ivtlr/fenced.py`\n```\n",
        encoding="utf-8")
    found = problems(planted.read_text(encoding="utf-8"), ROOT)
    assert sorted(found) == sorted([
        "refers outside the repository: '../shared'",
        "link to a missing path: docs/no_such_page.md",
        "link points outside the repository: ../../elsewhere.md",
        "missing path: src/ivtlr/no_such_module.py",
        "missing path: configs/no_such_config.yaml",
        "no such file in the repository: no_such_file.json",
        "path outside the repository: /etc/passwd",
        "path outside the repository: ../outside.md",
    ])


def test_braces_and_commands_are_read_as_paths():
    assert path_words("benchmarks/results/scaling_1thread_{a,b}.json") == [
        "benchmarks/results/scaling_1thread_a.json", "benchmarks/results/scaling_1thread_b.json"]
    assert path_words("./scripts/test.sh tests/test_house.py -x") == ["scripts/test.sh", "tests/test_house.py"]
    assert path_words("cpu\\|cuda") == []
    assert path_words("epoch // epochs_per_stage") == []
    assert path_words("GET /v1/models") == [] and path_words("/v1/models") == ["/v1/models"]
