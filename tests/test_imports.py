"""The import graph of model/, export/ and runtime/: no cycles, runtime never imports export, and the
onnxruntime path never imports torch.

The graph comes from the source (ast), function-level imports included: an import deferred into a function
still ties the two modules together. No exceptions are allowed.
"""
from __future__ import annotations

import ast
import subprocess
import sys

from conftest import ROOT

PACKAGES = ("model", "export", "runtime")



def module_name(path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (anywhere in its source)."""
    files = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph = {}
    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's package, up level - 1 more
                    pkg = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    pkg = pkg[:len(pkg) - (node.level - 1)]
                    base = ".".join(pkg + ([base] if base else []))
                # `from pkg import sub` imports the submodule pkg.sub when there is one, else a name of pkg
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in files:  # `import a.b.c` of a name: the deepest project module
                    t = t.rpartition(".")[0]
                if t and t != mod:
                    edges.add(t)
        graph[mod] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    graph = import_graph()
    cycles = find_cycles(graph)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_generation_modules_form_no_cycle():
    """The generation engine's modules in particular."""
    graph = {m: {t for t in ts if t.startswith("runtime.")} for m, ts in import_graph().items()
             if m.startswith("runtime.")}
    assert not find_cycles(graph), find_cycles(graph)


def test_runtime_does_not_import_export():
    graph = import_graph()
    edges = {(m, t) for m, ts in graph.items() if m.startswith("runtime") for t in ts if t.startswith("export")}
    assert not edges, f"runtime imports export (runtime sits below export): {sorted(edges)}"


def test_export_loads_backends_by_name_only():
    """export/ validates with onnxruntime sessions of its own; where it runs a model (the demo) it asks
    runtime.backends.load_backend by name, never imports a backend module."""
    edges = {(m, t) for m, ts in import_graph().items() if m.startswith("export") for t in ts
             if t.startswith("runtime.backends.")}
    assert not edges, f"export imports a backend module: {sorted(edges)}"


def test_torch_is_imported_only_in_model_export_and_the_torch_backend():
    allowed = ("model", "export", "runtime.backends.torch")
    found = []
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            mod = module_name(path)
            if mod == allowed[2] or mod.split(".")[0] in allowed[:2]:
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
                found += [f"{mod}: {n}" for n in names if n == "torch" or n.startswith("torch.")]
    assert not found, f"torch imported outside model/, export/ and runtime/backends/torch.py: {found}"


def test_the_onnxruntime_path_never_imports_torch():
    code = ("import sys\n"
            "import runtime.backends.onnxruntime, runtime.generation, runtime.loading, runtime.sampling, "
            "runtime.tokenizer, runtime.serve.scheduler, runtime.artifact\n"
            "try:\n    import runtime.serve.server\nexcept ImportError:\n    pass  # the [serve] extra is "
            "not installed\n"
            "mods = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
            "assert not mods, f'torch imported: {mods[:5]}'\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def test_ray_is_imported_only_by_serve_ray():
    """Ray (hundreds of modules, a second of startup) loads only when `serve --ray` runs: not for the plain server,
    the CLI's parser, or the Ray settings the CLI checks first (runtime/serve/ray_config.py)."""
    code = ("import sys\n"
            "import runtime.cli, runtime.cli.serve\n"
            "runtime.cli.build_parser(['serve'])\n"
            "try:\n    import runtime.serve.server, runtime.serve.ray_config\nexcept ImportError:\n    pass  # the "
            "[serve] extra is not installed\n"
            "mods = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'))\n"
            "assert not mods, f'ray imported: {mods[:5]}'\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    importers = set()
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
                if any(n == "ray" or n.startswith("ray.") for n in names):
                    importers.add(module_name(path))
    # ray_app at its top; the CLI inside run_ray only
    assert importers == {"runtime.serve.ray_app", "runtime.cli.serve"}, sorted(importers)
