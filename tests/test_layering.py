"""The package's shape, checked from its source (an AST walk over shadowserve/), so it stays true.

- Layers point one way: a module imports only from its own layer or the layers below it.
- No import cycle between modules (function-local imports included).
- Imports sit at the top of files; function-local imports only for optional dependencies, for the
  CLI loading what a subcommand needs when it runs (cli.py, commands/), and for lazy package facades
  (a module-level ``__getattr__``).
- No file over MAX_LINES lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "shadowserve"

# Top to bottom. The engine's port to a remote KV cache (engine/remote_kv.py) is inside the engine
# package, so the control plane implements it by importing downward.
LAYERS: list[set[str]] = [
    {"__init__", "cli", "commands"},
    {"bench", "server", "integrations"},
    {"llm", "settings"},
    {"controlplane"},
    {"engine"},
    {"dataplane"},
    {"store", "kvcache", "model"},
    {"config"},
    {"values", "cores"},
    {"errors"},
]

# May be imported inside functions: optional (extras, a device) or heavy for the one path that needs
# them (the CLI imports every subcommand's module to build its parser, so ``--help`` would pay).
OPTIONAL = {
    "torch.cuda": "CUDA only",
    "cuda": "cuda-python bindings: CUDA only",
    "vllm": "the vllm extra",
    "redis": "the redis client: only redis:// stores",
    "transformers": "the bench/test extra",
    "accelerate": "the bench/test extra",
    "matplotlib": "the bench extra",
    "scipy": "the bench extra (bench quality's exact tests)",
    "torch.nn.attention": "pulls in torch._dynamo (~3.5 s) for the one long-context prefill path",
    "gguf": "pulls in mistral_common (~1 s) for GGUF loading only",
    "jinja2": "~0.3 s, for chat templates only",
}

# Known debts, each with its reason; the test fails when one disappears, so this list only shrinks.
KNOWN_UPWARD: dict[tuple[str, str], str] = {}
KNOWN_LOCAL: dict[tuple[str, str], str] = {}
KNOWN_LONG: dict[str, str] = {}

MAX_LINES = 400


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


MODULES = _modules()


def _imports(path: Path) -> list[tuple[str, bool, bool]]:
    """(imported module, inside a function?, inside a module-level __getattr__?) for each import."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    me = _module_name(path)
    is_pkg = path.name == "__init__.py"
    out: list[tuple[str, bool, bool]] = []

    def visit(node: ast.AST, in_func: bool, in_getattr: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lazy = in_getattr or (not in_func and child.name == "__getattr__")
                visit(child, True, lazy)
                continue
            if isinstance(child, ast.Import):
                out.extend((a.name, in_func, in_getattr) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative import
                    anchor = me.split(".") if is_pkg else me.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (child.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                for a in child.names:
                    sub = f"{base}.{a.name}"
                    out.append((sub if sub in MODULES else base, in_func, in_getattr))
            visit(child, in_func, in_getattr)

    visit(tree, False, False)
    return out


def _component(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _layer(module: str) -> int:
    comp = _component(module)
    for i, names in enumerate(LAYERS):
        if comp in names:
            return i
    raise AssertionError(f"{module}: its package {comp!r} has no layer in tests/test_layering.py")


def _internal(name: str) -> str | None:
    """The shadowserve module an import names (the longest known prefix), or None if external."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in MODULES:
            return candidate
        parts.pop()
    return None


def _assert_none_but_known(found: dict[tuple[str, str], str], known: dict[tuple[str, str], str], what: str) -> None:
    """Fail on anything found that is not a known debt, and on a known debt that is gone (drop it)."""
    wrong = sorted(msg for key, msg in found.items() if key not in known)
    assert not wrong, f"{what}:\n" + "\n".join(wrong)
    gone = set(known) - set(found)
    assert not gone, f"fixed, so remove from the known debts: {gone}"


def test_every_layer_points_down():
    found = {}
    for module, path in MODULES.items():
        for name, _, _ in _imports(path):
            target = _internal(name)
            if target is not None and _layer(target) < _layer(module):
                found[module, target] = (f"{module} imports {target} "
                                         f"(layer {_component(target)} is above {_component(module)})")
    _assert_none_but_known(found, KNOWN_UPWARD, "imports that point up")


def test_no_import_cycles():
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for module, path in MODULES.items():
        for name, _, _ in _imports(path):
            target = _internal(name)
            if target is not None and target != module and not module.startswith(target + "."):
                graph[module].add(target)
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def walk(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                walk(nxt, stack)
        stack.pop()
        state[node] = 2

    for m in sorted(graph):
        if m not in state:
            walk(m, [])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_imports_sit_at_the_top():
    found = {}
    for module, path in MODULES.items():
        if _component(module) in ("cli", "commands"):
            continue  # the CLI loads what a subcommand needs when it runs
        for name, in_func, in_getattr in _imports(path):
            optional = any(name == o or name.startswith(o + ".") for o in OPTIONAL)
            if in_func and not in_getattr and not optional:
                found[module, _internal(name) or name] = f"{module}: import {name} inside a function"
    _assert_none_but_known(found, KNOWN_LOCAL, "function-local imports")


def test_no_file_is_too_long():
    found = {(m, ""): f"{m}: {n} lines" for m, p in MODULES.items()
             if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    _assert_none_but_known(found, {(m, ""): why for m, why in KNOWN_LONG.items()}, f"files over {MAX_LINES} lines")


def test_bench_helpers_never_import_suites():
    wrong = [f"{module} imports {target}"
             for module, path in MODULES.items() if module.startswith("shadowserve.bench.common")
             for name, _, _ in _imports(path)
             if (target := _internal(name) or "").startswith("shadowserve.bench.suites")]
    assert not wrong, "bench helpers that import a suite:\n" + "\n".join(wrong)
