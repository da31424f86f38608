"""Measures of the house, computed from the source (issue 21): top-level modules and packages, import layers, import
cycles, and the import chains from each command to the engine.

    python scripts/house_measures.py [--json OUT] [--src DIR] [--engine MODULE]

``--src DIR`` measures another checkout (its ``src`` directory): the import graph is built by grimp in a child
process whose ``sys.path`` starts with DIR, so that checkout's ``ivtlr`` is the one read (never the installed one).
Type-checking imports are left out, as the project's import-linter contracts leave them out (``--with-type-checking``
keeps them). Imports made by ``importlib.import_module`` are not seen (``ivtlr.cli`` dispatches that way).
Every function returns plain data, so the measures can be imported and tested.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "ivtlr"
ENGINE = "ivtlr.method.engine"
COMMANDS = ("ivtlr.cli", "ivtlr.training.cli", "ivtlr.evaluation.cli", "ivtlr.evaluation.infer",
            "ivtlr.evaluation.probe_cli", "ivtlr.demo.cli")

Graph = Mapping[str, Iterable[str]]  # module -> the modules it imports directly


# -- 1. what lies at the top of the package --------------------------------------------------------------------------

def top_level(package_dir: Path) -> dict:
    """The package's top-level modules (.py files other than __init__/__main__) and packages (folders with an
    __init__.py), by name."""
    package_dir = Path(package_dir)
    if not (package_dir / "__init__.py").is_file():
        raise FileNotFoundError(f"{package_dir} is not a package (no __init__.py)")
    modules = sorted(path.stem for path in package_dir.glob("*.py") if path.name not in ("__init__.py", "__main__.py"))
    packages = sorted(path.name for path in package_dir.iterdir()
                      if path.is_dir() and (path / "__init__.py").is_file())
    return {"modules": modules, "module_count": len(modules), "packages": packages, "package_count": len(packages)}


# -- the import graph ------------------------------------------------------------------------------------------------

def grimp_graph(package: str = PACKAGE, type_checking: bool = False):
    """grimp's graph of the ``package`` this process finds first on sys.path (external packages left out, imports
    under TYPE_CHECKING left out unless asked for, as the project's contracts do; nothing cached on disk)."""
    import grimp

    return grimp.build_graph(package, include_external_packages=False,
                             exclude_type_checking_imports=not type_checking, cache_dir=None)


def as_mapping(graph) -> dict[str, list[str]]:
    """A grimp graph as plain data: module -> sorted modules it imports directly."""
    return {module: sorted(graph.find_modules_directly_imported_by(module)) for module in sorted(graph.modules)}


def strongly_connected(graph: Graph) -> list[list[str]]:
    """Tarjan's strongly connected components (iterative), each sorted, in a stable order."""
    nodes = sorted(set(graph) | {target for targets in graph.values() for target in targets})
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    for root in nodes:
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, targets = work[-1]
            advanced = False
            for target in targets:
                if target not in index:
                    index[target] = low[target] = len(index)
                    stack.append(target)
                    on_stack.add(target)
                    work.append((target, iter(sorted(graph.get(target, ())))))
                    advanced = True
                    break
                if target in on_stack:
                    low[node] = min(low[node], index[target])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return sorted(components)


# -- 3. cycles -------------------------------------------------------------------------------------------------------

def cycles(graph: Graph) -> list[list[str]]:
    """The import cycles: every strongly connected component of more than one module, and every module that imports
    itself. Empty for an acyclic graph."""
    found = [component for component in strongly_connected(graph) if len(component) > 1]
    found += [[module] for module, targets in graph.items() if module in set(targets)]
    return sorted(found)


# -- 2. layers -------------------------------------------------------------------------------------------------------

def top_name(module: str, package: str = PACKAGE) -> str | None:
    """ivtlr.method.engine -> ivtlr.method; the package itself (its __init__) and its __main__ -> None."""
    parts = module.split(".")
    if parts[0] != package or len(parts) < 2 or parts[1] == "__main__":
        return None
    return ".".join(parts[:2])


def collapse(graph: Graph, package: str = PACKAGE) -> dict[str, list[str]]:
    """The graph of the top-level modules and packages: each module folded into its top-level name, imports within
    one name and the package's own __init__ and __main__ dropped (neither is a layer)."""
    collapsed: dict[str, set[str]] = {}
    for module, targets in graph.items():
        source = top_name(module, package)
        if source is None:
            continue
        collapsed.setdefault(source, set())
        for target in targets:
            folded = top_name(target, package)
            if folded is not None and folded != source:
                collapsed[source].add(folded)
                collapsed.setdefault(folded, set())
    return {name: sorted(targets) for name, targets in sorted(collapsed.items())}


def depths(graph: Graph) -> dict[str, int]:
    """The longest-path depth of each node: 0 for a node that imports nothing, else one more than the deepest node it
    imports. Nodes in one cycle share a depth (the cycle counts as one node)."""
    components = strongly_connected(graph)
    component_of = {node: number for number, component in enumerate(components) for node in component}
    below: dict[int, set[int]] = {number: set() for number in range(len(components))}
    for node, targets in graph.items():
        for target in targets:
            if component_of[target] != component_of[node]:
                below[component_of[node]].add(component_of[target])
    depth: dict[int, int] = {}

    def visit(number: int) -> int:  # the condensation is acyclic; iterate to stay clear of the recursion limit
        work = [number]
        while work:
            current = work[-1]
            missing = [lower for lower in below[current] if lower not in depth]
            if missing:
                work.extend(missing)
                continue
            work.pop()
            depth[current] = 1 + max((depth[lower] for lower in below[current]), default=-1)
        return depth[number]

    return {node: visit(component_of[node]) for node in sorted(component_of)}


def layers(graph: Graph, package: str = PACKAGE) -> dict:
    """The layering of the top-level names: each one's depth in the collapsed graph, the names on each level (level 0
    imports nothing of the package), the number of distinct levels, and any cycles between top-level names."""
    collapsed = collapse(graph, package)
    depth = depths(collapsed)
    levels: dict[int, list[str]] = {}
    for name, level in depth.items():
        levels.setdefault(level, []).append(name)
    return {"depth": depth, "levels": {str(level): sorted(levels[level]) for level in sorted(levels)},
            "level_count": len(levels), "collapsed_cycles": cycles(collapsed), "collapsed": collapsed}


# -- 4. chains -------------------------------------------------------------------------------------------------------

def shortest_chain(graph: Graph, source: str, target: str) -> list[str] | None:
    """The first by name of the shortest import chains source -> ... -> target (breadth first), or None if there is
    none: as long as grimp's find_shortest_chain (checked on the real graph), and the same from run to run."""
    if source == target:
        return [source]
    parent: dict[str, str] = {source: source}
    frontier = [source]
    while frontier:
        following = []
        for node in frontier:
            for imported in sorted(graph.get(node, ())):
                if imported in parent:
                    continue
                parent[imported] = node
                if imported == target:
                    chain = [imported]
                    while chain[-1] != source:
                        chain.append(parent[chain[-1]])
                    return chain[::-1]
                following.append(imported)
        frontier = following
    return None


def upstream(graph: Graph, target: str) -> set[str]:
    """The modules from which an import chain reaches ``target``, the target included."""
    importers: dict[str, set[str]] = {}
    for module, targets in graph.items():
        for imported in targets:
            importers.setdefault(imported, set()).add(module)
    found, frontier = {target}, [target]
    while frontier:
        frontier = [module for node in frontier for module in importers.get(node, ()) if module not in found]
        found.update(frontier)
    return found


def longest_chain(graph: Graph, source: str, target: str) -> list[str] | None:
    """The longest simple import chain source -> ... -> target, by dynamic programming over the modules that reach the
    target (ties broken by name, so the answer is stable); None if there is no chain. Needs an acyclic graph: raises
    ValueError if a cycle lies on a way from source to target (the longest simple path is then a hard problem); cycles
    elsewhere, or through the target itself, do not matter."""
    reaches = upstream(graph, target)
    if source not in reaches:
        return None
    best: dict[str, list[str]] = {target: [target]}
    state: dict[str, str] = {target: "done"}
    work = [source]
    while work:
        node = work[-1]
        if state.get(node) == "done":
            work.pop()
            continue
        targets = sorted(imported for imported in graph.get(node, ()) if imported in reaches)
        if state.get(node) != "open":
            state[node] = "open"
            for imported in targets:
                if state.get(imported) == "open":
                    raise ValueError(f"an import cycle runs through {imported} on the way from {source} to {target}")
                if imported not in state:
                    work.append(imported)
            continue
        work.pop()
        state[node] = "done"
        best[node] = [node] + max((best[imported] for imported in targets), key=len)  # the first longest, by name
    return best[source]


def chains(graph: Graph, commands: Iterable[str], engine: str, real=None) -> dict:
    """For each command module present in the graph: the shortest chain to the engine and the longest simple chain,
    with their lengths in imports (edges). The shortest is the first by name among the shortest (grimp's
    find_shortest_chain picks any one of them, differently from run to run); when a grimp graph is given, its chain is
    kept as ``shortest_grimp`` and must be as long. Commands missing from the graph are listed as skipped."""
    found: dict[str, dict] = {}
    commands = list(commands)
    skipped = [command for command in commands if command not in graph]
    for command in commands:
        if command in skipped:
            continue
        shortest = shortest_chain(graph, command, engine)
        entry: dict = {"shortest": shortest, "shortest_length": len(shortest) - 1 if shortest else None}
        if real is not None:
            by_grimp = real.find_shortest_chain(importer=command, imported=engine)
            entry["shortest_grimp"] = list(by_grimp) if by_grimp is not None else None
            if (by_grimp is None) != (shortest is None) or (shortest and len(by_grimp) != len(shortest)):
                raise AssertionError(f"grimp's shortest chain {by_grimp} and {shortest} differ in length")
        try:
            longest = longest_chain(graph, command, engine)
        except ValueError as exc:
            longest, entry["longest_error"] = None, str(exc)
        entry.update(longest=longest, longest_length=len(longest) - 1 if longest else None)
        found[command] = entry
    return {"engine": engine, "commands": found, "skipped": skipped}


# -- all of it -------------------------------------------------------------------------------------------------------

def measure_here(package: str = PACKAGE, engine: str = ENGINE, commands: Iterable[str] = COMMANDS,
                 type_checking: bool = False) -> dict:
    """Every measure of the ``package`` this process imports (the child's half of ``measure``)."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"no package {package!r} on sys.path")
    package_dir = Path(list(spec.submodule_search_locations)[0])
    real = grimp_graph(package, type_checking)
    graph = as_mapping(real)
    commands = list(commands)
    return {"package": package, "package_dir": str(package_dir), "type_checking_imports": type_checking,
            "module_total": len(graph), "import_total": sum(len(targets) for targets in graph.values()),
            "top_level": top_level(package_dir), "layers": layers(graph, package), "cycles": cycles(graph),
            "chains": chains(graph, commands, engine, real), "graph": graph}


def measure(src: str | Path = REPO / "src", package: str = PACKAGE, engine: str = ENGINE,
            commands: Iterable[str] = COMMANDS, type_checking: bool = False) -> dict:
    """Every measure of ``src/<package>``, computed in a child process whose sys.path starts with ``src`` (so the
    checkout asked for is measured, whatever this process has imported). Checks the child read that checkout."""
    src = Path(src).resolve()
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", "--src", str(src), "--package", package,
            "--engine", engine, "--commands", ",".join(commands)]
    if type_checking:
        argv.append("--with-type-checking")
    done = subprocess.run(argv, capture_output=True, text=True, cwd=src)
    if done.returncode != 0:
        raise RuntimeError(f"measuring {src} failed:\n{done.stderr.strip()}")
    result = json.loads(done.stdout)
    if Path(result["package_dir"]).resolve() != src / package:
        raise RuntimeError(f"asked to measure {src / package} but the child read {result['package_dir']}")
    return result


def table(result: dict) -> str:
    """The short table printed by the script."""
    top, lay, chain = result["top_level"], result["layers"], result["chains"]
    lines = [f"measures of {result['package_dir']} ({result['module_total']} modules, {result['import_total']} "
             f"direct imports{', type-checking imports included' if result['type_checking_imports'] else ''})",
             f"  top-level modules   {top['module_count']:>3}  {' '.join(top['modules'])}",
             f"  top-level packages  {top['package_count']:>3}  {' '.join(top['packages'])}",
             f"  import levels       {lay['level_count']:>3}"]
    for level, names in sorted(lay["levels"].items(), key=lambda item: -int(item[0])):
        lines.append(f"    level {level:>2}: {' '.join(name.split('.', 1)[1] for name in names)}")
    if lay["collapsed_cycles"]:
        lines.append(f"  cycles between top-level names: {lay['collapsed_cycles']}")
    lines.append(f"  import cycles       {len(result['cycles']):>3}" +
                 "".join(f"\n    {' <-> '.join(component)}" for component in result["cycles"]))
    lines.append(f"  chains to {chain['engine']} (imports: shortest / longest)")
    for command, found in chain["commands"].items():
        if not found["shortest"]:
            lines.append(f"    {command:<28} no static chain (imports by importlib.import_module are not seen)")
            continue
        lines.append(f"    {command:<28} {found['shortest_length']} / {found['longest_length']}")
        lines.append(f"      shortest: {' -> '.join(found['shortest'])}")
        if found["longest"]:
            lines.append(f"      longest:  {' -> '.join(found['longest'])}")
        if found.get("longest_error"):
            lines.append(f"      longest:  {found['longest_error']}")
    if chain["skipped"]:
        lines.append(f"    skipped (not in this tree): {' '.join(chain['skipped'])}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="also write the measures as JSON to this path")
    parser.add_argument("--src", default=str(REPO / "src"), help="the src directory of the checkout to measure")
    parser.add_argument("--package", default=PACKAGE)
    parser.add_argument("--engine", default=ENGINE, help=f"the engine module (default {ENGINE})")
    parser.add_argument("--commands", default=",".join(COMMANDS), help="comma-separated command modules")
    parser.add_argument("--with-type-checking", action="store_true", help="keep imports under TYPE_CHECKING")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    commands = [command for command in args.commands.split(",") if command]
    if args.child:
        sys.path.insert(0, str(Path(args.src).resolve()))
        result = measure_here(args.package, args.engine, commands, args.with_type_checking)
        json.dump(result, sys.stdout)
        return 0
    result = measure(args.src, args.package, args.engine, commands, args.with_type_checking)
    print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
