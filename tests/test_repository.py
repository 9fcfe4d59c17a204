"""The repository stands alone: no tracked file points at documents or folders outside the checkout."""

from __future__ import annotations

import re
import subprocess
import sys

from conftest import REPO

OUTSIDE = re.compile(r"\.\./shared|conventions\.md")


def _tracked() -> list:
    out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return [REPO / p for p in out.splitlines() if (REPO / p).is_file()]


def test_no_file_refers_outside_the_repository():
    files = _tracked()
    assert len(files) > 50  # the listing worked (a test that reads nothing cannot fail)
    hits = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        hits += [f"{path.relative_to(REPO)}:{i}: {line.strip()}" for i, line in enumerate(text.splitlines(), 1)
                 if OUTSIDE.search(line) and path.name != "test_repository.py"]
    assert not hits, "files refer to things outside the repository:\n" + "\n".join(hits)


def test_the_check_finds_a_reference():
    assert OUTSIDE.search("see ../shared/docs/method.md") and OUTSIDE.search("(conventions.md)")
    assert not OUTSIDE.search("docs/method.md, 'Profiles'")


def _package_imports() -> dict:
    """{module: {(imported tskd module, at top level?)}} from the source of tskd_utils (not datasets/)."""
    import ast

    graph = {}
    for path in sorted((REPO / "tskd_utils").glob("*.py")):
        tree = ast.parse(path.read_text())
        top = set(tree.body)
        edges = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                names = [node.module.split(".")[0]] if node.module else [a.name for a in node.names]
                edges |= {(n, node in top) for n in names if (REPO / "tskd_utils" / f"{n}.py").is_file()}
        graph[path.stem] = edges
    return graph


def _cycles(graph: dict) -> list:
    edges = {m: {t for t, _ in e} for m, e in graph.items()}
    found = []

    def walk(start, node, path):
        for nxt in sorted(edges.get(node, ())):
            if nxt == start:
                found.append(path + [start])
            elif nxt not in path and nxt > start:
                walk(start, nxt, path + [nxt])

    for m in sorted(edges):
        walk(m, m, [m])
    return found


def test_the_package_imports_only_point_down():
    graph = _package_imports()
    assert {"checkpoints", "runner", "teacher", "distill", "evaluate", "reproduce", "executors"} <= set(graph)
    assert _cycles(graph) == []
    # the light sweep driver (reproduce, runner, sweep_report: no torch in its process) imports the modules that pull
    # in torch inside its functions; every other import of a tskd module is at the top of its file
    driver, with_torch = ("reproduce", "runner", "sweep_report"), ("data", "evaluate", "models", "run")
    inner = sorted(f"{m} -> {t}" for m, e in graph.items() for t, at_top in e
                   if not at_top and not (m in driver and t in with_torch))
    assert inner == []


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {("b", True)}, "b": {("c", False)}, "c": {("a", True)}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {("b", True)}, "b": set()}) == []


def test_the_sweep_driver_starts_without_torch():
    code = "import sys, tskd_utils.reproduce; assert 'torch' not in sys.modules, 'reproduce imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_the_longest_test_files_are_handed_out_first():
    """make test's order of files (tests/conftest.py) names files that exist and is not undone by pytest-xdist's
    default re-sorting by number of tests (which puts the few-test sweep files last)."""
    from conftest import LONGEST_FIRST

    assert all((REPO / "tests" / name).is_file() for name in LONGEST_FIRST), LONGEST_FIRST
    xdist = next(ln for ln in (REPO / "Makefile").read_text().splitlines() if ln.startswith("XDIST :="))
    assert "--dist loadfile" in xdist and "--no-loadscope-reorder" in xdist
