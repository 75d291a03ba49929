"""The layering and size targets of the package (issue 14), read from the source's AST.

Library modules (``python/igpt`` minus ``commands/``, ``cli.py`` and ``__main__.py``) never
print, exit or import the command line; the units the redesign split stay small.
"""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "python" / "igpt"
CLI_MODULES = {"cli.py", "__main__.py"}


def _tree(name: str) -> ast.Module:
    return ast.parse((PKG / name).read_text(), filename=name)


def _length(node: ast.AST) -> int:
    return node.end_lineno - node.lineno + 1


def _unit(tree: ast.Module, name: str) -> ast.AST:
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == name:
            return node
    raise AssertionError(f"{name} is not defined at the top level")


def _functions(node: ast.AST):
    return [n for n in ast.walk(node) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def _library_modules() -> list[Path]:
    return sorted(
        p
        for p in PKG.rglob("*.py")
        if "commands" not in p.relative_to(PKG).parts and p.name not in CLI_MODULES
    )


@pytest.mark.parametrize(
    "module, unit, most",
    [
        ("train.py", "Trainer", 250),
        ("finetune.py", "Finetuner", 200),
        ("demo.py", "run_demo", 80),
        ("model.py", "IGPT", 170),
    ],
)
def test_unit_lengths(module, unit, most):
    n = _length(_unit(_tree(module), unit))
    assert n <= most, f"{module}:{unit} is {n} lines; the target is at most {most}"


@pytest.mark.parametrize(
    "module, most",
    [
        ("model.py", 260),
        ("probe.py", 750),
        # the training layer (issue 21): split by concern, each module <= 700 lines
        *((m, 700) for m in ("train.py", "finetune.py", "memory.py", "memory_estimate.py")),
        *((m, 700) for m in ("trainconfig.py", "pretrain_setup.py", "training.py")),
        *((m, 700) for m in ("classifier.py", "memplan.py")),
    ],
)
def test_module_lengths(module, most):
    n = len((PKG / module).read_text().splitlines())
    assert n <= most, f"{module} is {n} lines; the target is at most {most}"


@pytest.mark.parametrize(
    "module, unit, most",
    [
        ("train.py", "Trainer", 45),
        ("finetune.py", None, 50),
        ("training.py", None, 50),
        ("pretrain_setup.py", None, 50),
        ("classifier.py", None, 50),
        ("memplan.py", None, 50),
        ("memory.py", None, 80),
        ("memory_estimate.py", None, 80),
    ],
)
def test_no_long_functions(module, unit, most):
    tree = _tree(module)
    scope = tree if unit is None else _unit(tree, unit)
    long = {f"{f.name} ({_length(f)})" for f in _functions(scope) if _length(f) > most}
    assert not long, f"{module}: functions over {most} lines: {sorted(long)}"


def _cli_leaks(tree: ast.Module) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
            found.append(f"print() at line {node.lineno}")
        elif isinstance(node, ast.Name) and node.id == "SystemExit":
            found.append(f"SystemExit at line {node.lineno}")
        elif isinstance(node, ast.ImportFrom) and (
            (node.module or "").startswith(("igpt.cli", "igpt.commands"))
            or (node.module == "igpt" and {a.name for a in node.names} & {"cli", "commands"})
        ):
            found.append(f"from {node.module} import ... at line {node.lineno}")
        elif isinstance(node, ast.Import) and any(
            a.name.startswith(("igpt.cli", "igpt.commands")) for a in node.names
        ):
            found.append(f"import igpt.cli/commands at line {node.lineno}")
    return found


@pytest.mark.parametrize("path", _library_modules(), ids=lambda p: str(p.relative_to(PKG)))
def test_library_modules_neither_print_nor_exit(path):
    leaks = _cli_leaks(ast.parse(path.read_text(), filename=str(path)))
    assert not leaks, f"{path.relative_to(PKG)} holds command-line code: {leaks}"


def test_the_leak_check_can_fail():
    bad = "import igpt.cli\nfrom igpt.commands._common import x\nprint(1)\nraise SystemExit(2)\n"
    assert len(_cli_leaks(ast.parse(bad))) == 4


# ----------------------------------------------------------------------------- layering (issue 21)

ROOT = PKG.parents[1]
KERNELS = ROOT / "igpt_kernels"
MAX_FUNCTION, MAX_MODULE = 80, 700
EXTENSIONS = {"igpt_kernels._C"}  # compiled modules: private by name, imported as modules


def _module_name(path: Path) -> str:
    base, pkg = (PKG, "igpt") if PKG in path.parents else (KERNELS, "igpt_kernels")
    parts = path.relative_to(base).with_suffix("").parts
    return ".".join((pkg, *parts)).removesuffix(".__init__")


def _all_modules() -> dict[str, Path]:
    paths = list(PKG.rglob("*.py")) + list(KERNELS.glob("*.py"))
    return {_module_name(p): p for p in sorted(paths)}


def _imports(tree: ast.AST, modules) -> set[str]:
    """Every module of ours that ``tree`` imports, function-local imports included."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:  # "from igpt import hf": the submodule, not the package
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in modules else node.module)
    return {m for m in found if m in modules}


def _import_graph(sources: dict[str, str]) -> dict[str, set[str]]:
    return {m: _imports(ast.parse(src), sources) - {m} for m, src in sources.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _sources() -> dict[str, str]:
    return {m: p.read_text() for m, p in _all_modules().items()}


def test_no_import_cycle():
    cycles = _cycles(_import_graph(_sources()))
    assert not cycles, f"import cycles (function-local imports included): {cycles}"


def test_the_cycle_check_can_fail():
    sources = {"igpt.a": "def f():\n    from igpt import b\n", "igpt.b": "import igpt.a\n"}
    assert _cycles(_import_graph(sources)) == [["igpt.a", "igpt.b"]]


def test_kernels_do_not_import_the_model_layer():
    graph = _import_graph(_sources())
    bad = {m: sorted(d) for m, d in graph.items() if m.startswith("igpt_kernels")}
    bad = {m: [d for d in deps if not d.startswith("igpt_kernels")] for m, deps in bad.items()}
    assert not {m: d for m, d in bad.items() if d}


def _is_triton_kernel(fn: ast.AST) -> bool:
    return any("jit" in ast.unparse(d) for d in fn.decorator_list)


def _long_functions(tree: ast.AST) -> list[str]:
    return [
        f"{f.name} ({_length(f)} lines, line {f.lineno})"
        for f in _functions(tree)
        if _length(f) > MAX_FUNCTION and not _is_triton_kernel(f)
    ]


@pytest.mark.parametrize("module", sorted(_all_modules()))
def test_no_long_function_or_module(module):
    path = _all_modules()[module]
    text = path.read_text()
    assert len(text.splitlines()) <= MAX_MODULE, f"{module} is over {MAX_MODULE} lines"
    long = _long_functions(ast.parse(text))
    assert not long, f"{module}: functions over {MAX_FUNCTION} lines: {long}"


def _private_imports(tree: ast.AST, modules) -> list[str]:
    """``from igpt.x import _name`` where ``_name`` is not itself a module."""
    return [
        f"{node.module}.{a.name} (line {node.lineno})"
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("igpt")
        for a in node.names
        if a.name.startswith("_")
        and not a.name.startswith("__")  # __version__ and the like are public
        and f"{node.module}.{a.name}" not in set(modules) | EXTENSIONS
    ]


@pytest.mark.parametrize("module", sorted(_all_modules()))
def test_no_private_name_imported_across_modules(module):
    modules = _all_modules()
    found = _private_imports(ast.parse(modules[module].read_text()), modules)
    assert not found, f"{module} imports private names of other modules: {found}"


def test_the_size_and_privacy_checks_can_fail():
    long = "def f():\n" + "    x = 1\n" * MAX_FUNCTION
    jit = "@triton.jit\n" + long
    assert _long_functions(ast.parse(long)) and not _long_functions(ast.parse(jit))
    tree = ast.parse("from igpt.features import _resolve_layers\nfrom igpt import _io\n")
    assert _private_imports(tree, {"igpt._io"}) == ["igpt.features._resolve_layers (line 1)"]
