"""The product's import graph: no cycles anywhere, and the one direction of the flow (serving never imports training)."""

from __future__ import annotations

from pathlib import Path

from tests.support.imports import import_cycle, import_graph

REPO = Path(__file__).resolve().parents[1]
PRODUCT = ("inference", "training", "export", "service", "batch", "deploy", "benchmarks")


def test_the_product_has_no_import_cycle():
    graph = import_graph(REPO, PRODUCT)
    assert {"service.app", "service.oip", "batch.engines.base", "batch.engines.ray", "benchmarks.load_test"} <= set(
        graph
    )
    cycle = import_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_serving_and_batch_scoring_never_import_training_or_export():
    graph = import_graph(REPO, PRODUCT)
    for module, imported in graph.items():
        if module.split(".")[0] in ("inference", "service", "batch"):
            assert not {m for m in imported if m.split(".")[0] in ("training", "export")}, module


def test_the_graph_sees_imports_inside_functions_and_relative_ones(tmp_path):
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "a.py").write_text("from pkg import b\n")
    (tmp_path / "pkg" / "b.py").write_text("def late():\n    from pkg.a import x\n")
    (tmp_path / "pkg" / "sub" / "__init__.py").write_text("from . import c\n")
    (tmp_path / "pkg" / "sub" / "c.py").write_text("from ..a import thing\n")
    graph = import_graph(tmp_path, ("pkg",))
    assert graph == {
        "pkg": set(),
        "pkg.a": {"pkg", "pkg.b"},
        "pkg.b": {"pkg.a"},
        "pkg.sub": {"pkg.sub.c"},
        "pkg.sub.c": {"pkg.a"},
    }
    assert import_cycle(graph) == ["pkg.a", "pkg.b", "pkg.a"]
