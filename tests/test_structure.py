"""The package's shape: no import cycles, short functions, notebooks that only narrate, a documented public surface."""

import ast
import json
import re
from pathlib import Path

import pytest

import refusal_lens as rl

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "refusal_lens"
MAX_BODY_LINES = 60  # longer functions say why in their docstring ("Long because ...")


def _modules() -> dict[str, ast.Module]:
    return {path.stem: ast.parse(path.read_text()) for path in sorted(PACKAGE.glob("*.py"))}


def _imports(tree: ast.Module) -> set[str]:
    """Modules of the package that ``tree`` imports, at any depth (lazy imports inside functions count too)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found.update([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("refusal_lens."):
            found.add(node.module.split(".")[1])
    return found


def test_no_module_imports_itself_through_others():
    modules = _modules()
    graph = {name: _imports(tree) & set(modules) - {name} for name, tree in modules.items() if name != "__init__"}
    graph = {name: deps - {"__init__"} for name, deps in graph.items()}
    cycles = []

    def visit(name: str, path: list[str]) -> None:
        for dep in sorted(graph.get(name, ())):
            if dep in path:
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in done:
                visit(dep, path + [dep])
        done.add(name)

    done: set[str] = set()
    for name in graph:
        visit(name, [name])
    assert not cycles, f"import cycles: {cycles[:3]}"
    assert "organism" not in graph["models"] and "models" in graph["organism"]  # loading does not know training


def test_functions_are_short_or_say_why():
    long = []
    for name, tree in _modules().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = node.body[1:] if ast.get_docstring(node) else node.body
                lines = node.end_lineno - body[0].lineno + 1 if body else 0
                if lines > MAX_BODY_LINES and "Long because" not in (ast.get_docstring(node) or ""):
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert not long, long


def test_notebooks_only_narrate():
    """Code cells call the package through ``rl``: no function or class definitions, no imports from inside it."""
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        for cell in json.loads(path.read_text())["cells"]:
            if cell["cell_type"] != "code":
                continue
            source = "".join(cell["source"])
            tree = ast.parse(re.sub(r"^\s*[%!].*$", "", source, flags=re.M))
            defined = [type(n).__name__ for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef,
                                                                                  ast.Lambda))]
            assert not defined, f"{path.name}: a cell defines {defined}: move it into refusal_lens\n{source}"
            internal = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                        and (n.module or "").startswith("refusal_lens")]
            assert not internal, f"{path.name}: imports {internal}; use `import refusal_lens as rl`"
            assert "rl._" not in source, f"{path.name} reaches into a private name"


def test_api_reference_documents_exactly_the_public_surface():
    """docs/api.md renders each name of ``rl.__all__`` from its docstring (mkdocstrings), once each."""
    page = (ROOT / "docs" / "api.md").read_text()
    listed = re.findall(r"^::: refusal_lens\.([A-Za-z_]+)$", page, flags=re.M)
    assert sorted(listed) == sorted(rl.__all__), (sorted(set(rl.__all__) - set(listed)),
                                                  sorted(set(listed) - set(rl.__all__)))
    assert len(listed) == len(set(listed))
    assert all(hasattr(rl, name) for name in rl.__all__)


def test_shape_annotations_are_checked_at_test_time():
    """pyproject's --jaxtyping-packages puts beartype on the package: a width mismatch between two arguments
    annotated with the same ``d_model`` fails at the call, before any arithmetic; ints pass as floats (PEP 484)."""
    import jaxtyping
    import torch

    with pytest.raises(jaxtyping.TypeCheckError, match="d_model"):
        rl.stats.principal_angles(torch.randn(2, 8), torch.randn(3, 9))
    assert rl.stats.principal_angles(torch.eye(2, 8), torch.eye(2, 8)).shape == (2,)
    assert rl.stats.subspace_rank(torch.randn(4, 8), variance=1)["rank_for_variance"] >= 1


MAX_MODULE_LINES = 450  # longer modules say why in their docstring ("Long because ...")


def test_modules_are_short_or_say_why():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        if text.count("\n") > MAX_MODULE_LINES and "Long because" not in (ast.get_docstring(ast.parse(text)) or ""):
            long.append(f"{path.relative_to(ROOT)} ({text.count(chr(10))} lines)")
    assert not long, f"modules over {MAX_MODULE_LINES} lines without a reason in their docstring: {long}"
