"""scripts/house_measures.py (issue 21): the house's measures hold on the current tree, and the measuring finds what
it is there to find (a cycle, a longer chain) when one is planted."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "house_measures.py"
_spec = importlib.util.spec_from_file_location("house_measures", SCRIPT)
house_measures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(house_measures)


@pytest.fixture(scope="module")
def current() -> dict:
    return house_measures.measure()


def test_the_current_tree_is_small_at_the_top_and_has_no_cycle(current):
    assert Path(current["package_dir"]) == SCRIPT.parents[1] / "src" / "ivtlr"
    assert 0 < current["top_level"]["module_count"] <= 12
    assert "method" in current["top_level"]["packages"]
    assert current["cycles"] == []
    assert current["layers"]["collapsed_cycles"] == []
    assert current["layers"]["depth"]["ivtlr.errors"] == 0
    assert current["layers"]["depth"]["ivtlr.method"] > current["layers"]["depth"]["ivtlr.backbones"]


def test_the_current_chains_to_the_engine_are_real_paths(current):
    graph = current["graph"]
    found = current["chains"]["commands"]
    assert current["chains"]["skipped"] == []
    assert set(found) == set(house_measures.COMMANDS)
    for command in ("ivtlr.training.cli", "ivtlr.evaluation.cli", "ivtlr.demo.cli"):
        shortest, longest = found[command]["shortest"], found[command]["longest"]
        assert shortest[0] == longest[0] == command and shortest[-1] == longest[-1] == house_measures.ENGINE
        assert all(b in graph[a] for chain in (shortest, longest) for a, b in zip(chain, chain[1:]))
        assert len(set(longest)) == len(longest) >= len(shortest)
        # grimp's shortest chain is a real path as long as the script's own (stable) one
        by_grimp = found[command]["shortest_grimp"]
        assert len(by_grimp) == len(shortest) and all(b in graph[a] for a, b in zip(by_grimp, by_grimp[1:]))


def _package(root: Path, files: dict[str, str]) -> Path:
    package = root / "planted"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    for name, text in files.items():
        path = package / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_a_planted_cycle_is_found(tmp_path):
    src = _package(tmp_path, {
        "a.py": "import planted.b\n",
        "b.py": "from planted import a, e\n",
        "c.py": "import planted.a\n",
        "e.py": "",
        "sub/__init__.py": "", "sub/d.py": "import planted.c\n",
        "__main__.py": "import planted.c\n",
    })
    result = house_measures.measure(src, package="planted", engine="planted.e",
                                    commands=["planted.c", "planted.missing"])
    assert result["top_level"] == {"modules": ["a", "b", "c", "e"], "module_count": 4, "packages": ["sub"],
                                   "package_count": 1}
    assert result["cycles"] == [["planted.a", "planted.b"]]
    assert result["layers"]["collapsed_cycles"] == [["planted.a", "planted.b"]]
    assert result["layers"]["depth"] == {"planted.a": 1, "planted.b": 1, "planted.c": 2, "planted.e": 0,
                                         "planted.sub": 3}
    assert result["chains"]["skipped"] == ["planted.missing"]
    chain = result["chains"]["commands"]["planted.c"]
    assert chain["shortest"] == ["planted.c", "planted.a", "planted.b", "planted.e"]
    assert chain["longest"] is None and "cycle" in chain["longest_error"]


def test_a_cycle_only_under_type_checking_counts_only_when_asked(tmp_path):
    src = _package(tmp_path, {
        "a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import planted.b\n",
        "b.py": "import planted.a\n",
    })
    assert house_measures.measure(src, package="planted", commands=[])["cycles"] == []
    with_hints = house_measures.measure(src, package="planted", commands=[], type_checking=True)
    assert with_hints["cycles"] == [["planted.a", "planted.b"]]


def test_the_script_writes_its_json_and_measures_the_checkout_asked_for(tmp_path, capsys):
    src = _package(tmp_path / "src", {"a.py": "import planted.b\n", "b.py": ""})
    out = tmp_path / "out.json"
    assert house_measures.main(["--src", str(src), "--package", "planted", "--engine", "planted.b",
                                "--commands", "planted.a", "--json", str(out)]) == 0
    written = json.loads(out.read_text())
    assert Path(written["package_dir"]) == src.resolve() / "planted"
    assert written["chains"]["commands"]["planted.a"]["longest"] == ["planted.a", "planted.b"]
    printed = capsys.readouterr().out
    assert "top-level modules     2" in printed and "import cycles         0" in printed


def test_cycles_and_chains_on_plain_graphs():
    graph = {"a": ["b", "d"], "b": ["c"], "c": ["d"], "d": [], "e": ["e"]}
    assert house_measures.cycles(graph) == [["e"]]
    assert house_measures.shortest_chain(graph, "a", "d") == ["a", "d"]
    assert house_measures.longest_chain(graph, "a", "d") == ["a", "b", "c", "d"]
    assert house_measures.longest_chain(graph, "d", "a") is None
    assert house_measures.depths({k: v for k, v in graph.items() if k != "e"}) == {"a": 3, "b": 2, "c": 1, "d": 0}
    assert house_measures.cycles({"x": ["y"], "y": ["z"], "z": ["x"], "w": ["x"]}) == [["x", "y", "z"]]
    with pytest.raises(ValueError, match="cycle"):
        house_measures.longest_chain({"x": ["y"], "y": ["x", "t"], "t": []}, "x", "t")
    # a cycle that never reaches the target, or one through the target, leaves the longest chain well defined
    assert house_measures.longest_chain({"x": ["y", "t"], "y": ["z"], "z": ["y"], "t": []}, "x", "t") == ["x", "t"]
    assert house_measures.longest_chain({"x": ["y"], "y": ["t"], "t": ["y"]}, "x", "t") == ["x", "y", "t"]


def test_the_collapsed_layers_fold_modules_into_their_top_level_name():
    graph = {"p": ["p.m.x"], "p.__main__": ["p.cli"], "p.cli": ["p.m.x"], "p.m": [], "p.m.x": ["p.m.y", "p.base"],
             "p.m.y": ["p.base"], "p.base": []}
    found = house_measures.layers(graph, package="p")
    assert found["collapsed"] == {"p.base": [], "p.cli": ["p.m"], "p.m": ["p.base"]}
    assert found["levels"] == {"0": ["p.base"], "1": ["p.m"], "2": ["p.cli"]} and found["level_count"] == 3


def test_nothing_is_read_from_the_installed_package_when_another_src_is_asked(tmp_path):
    (tmp_path / "empty").mkdir()
    # no ivtlr there: the child finds the installed one further down sys.path, and the measure refuses it
    with pytest.raises(RuntimeError, match="but the child read .*src/ivtlr"):
        house_measures.measure(tmp_path / "empty")
