"""The shape of the package, read from its source with ``ast``: one error hierarchy, no private names shared
between modules, no import cycles, loggers named after their modules.

Nothing here imports the modules it inspects except where a test needs the live classes (the error hierarchy).
"""

from __future__ import annotations

import ast
import importlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import osscar_hf
from osscar_hf import errors

PACKAGE = "osscar_hf"
PACKAGE_DIR = Path(osscar_hf.__file__).resolve().parent
# Files shipped in the package that are never imported as part of it: the templates copied beside remote-code
# checkpoints (transformers imports them from there) and the ``evaluate`` metric script (loaded by path).
NOT_PACKAGE_MODULES = ("remote_code/", "metrics/perplexity/")
# Exceptions that are control flow inside one module, never raised to a caller: they stay private there.
PRIVATE_SIGNALS = {"osscar_hf.capture._CaptureDone"}


@dataclass(frozen=True)
class Import:
    """One import statement's effect: ``source`` depends on module ``target``, for ``names`` (empty: the module)."""

    source: str
    target: str
    names: tuple[str, ...]
    line: int
    function_level: bool


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_files() -> dict[str, Path]:
    """Every module of the package by dotted name (templates and the metric script excluded)."""
    files = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        relative = path.relative_to(PACKAGE_DIR).as_posix()
        if not relative.startswith(NOT_PACKAGE_MODULES):
            files[module_name(path)] = path
    return files


MODULES = package_files()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _resolve_from(source: str, node: ast.ImportFrom) -> str:
    """The absolute module named by ``from <level dots><module> import ...`` in module ``source``."""
    if node.level == 0:
        return node.module or ""
    base = source.split(".")
    if not _is_package(source):
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _enclosing_functions(tree: ast.AST) -> set[int]:
    """ids of the import nodes that sit inside a function body."""
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            inside.update(id(child) for child in ast.walk(node) if isinstance(child, (ast.Import, ast.ImportFrom)))
    return inside


def _lazy_exports(source: str, tree: ast.Module) -> Iterator[Import]:
    """A module-level table of ``name -> "osscar_hf.module"`` read by ``importlib`` is an import of each module."""
    for node in tree.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Dict):
            values = node.value.values
            if values and all(isinstance(v, ast.Constant) and v.value in MODULES for v in values):
                for key, value in zip(node.value.keys, values):
                    name = key.value if isinstance(key, ast.Constant) else ""
                    yield Import(source, value.value, (name,), node.lineno, function_level=True)


def imports_of(source: str) -> list[Import]:
    """Every intra-package import of module ``source``, at module level or inside functions."""
    tree = ast.parse(MODULES[source].read_text(encoding="utf-8"))
    in_function = _enclosing_functions(tree)
    found: list[Import] = list(_lazy_exports(source, tree))
    for node in ast.walk(tree):
        nested = id(node) in in_function
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in MODULES:
                    found.append(Import(source, alias.name, (), node.lineno, nested))
        elif isinstance(node, ast.ImportFrom):
            target = _resolve_from(source, node)
            if target not in MODULES:
                continue
            plain = []
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                if submodule in MODULES:  # ``from package import submodule`` imports the submodule
                    found.append(Import(source, submodule, (), node.lineno, nested))
                else:
                    plain.append(alias.name)
            if plain:
                found.append(Import(source, target, tuple(plain), node.lineno, nested))
    return found


def import_graph() -> dict[str, set[str]]:
    return {name: {imp.target for imp in imports_of(name) if imp.target != name} for name in MODULES}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


# --------------------------------------------------------------------------- one error hierarchy
def _exception_classes() -> Iterator[tuple[str, type[BaseException]]]:
    """Every exception class defined (not imported) in a module of the package, by qualified name."""
    for name in MODULES:
        module = importlib.import_module(name)
        for value in vars(module).values():
            if (inspect.isclass(value) and issubclass(value, BaseException) and value.__module__ == name):
                yield f"{name}.{value.__qualname__}", value


def test_every_error_class_is_defined_in_errors_and_is_an_osscar_error():
    defined = dict(_exception_classes())
    assert "osscar_hf.errors.OsscarError" in defined
    outside = sorted(set(n for n, cls in defined.items() if cls.__module__ != "osscar_hf.errors") - PRIVATE_SIGNALS)
    assert outside == [], f"define these in osscar_hf/errors.py: {outside}"
    for name, cls in defined.items():
        if name in PRIVATE_SIGNALS:
            continue
        assert issubclass(cls, errors.OsscarError), name
        assert cls.__doc__, f"{name} has no docstring"
        builtins = [base for base in cls.__mro__ if base.__module__ == "builtins" and base not in (Exception,
                                                                                                  BaseException, object)]
        assert cls is errors.OsscarError or builtins, f"{name} subclasses no built-in error besides Exception"


def test_the_error_hierarchy_is_listed_and_exported():
    classes = {n for n, v in vars(errors).items() if inspect.isclass(v) and issubclass(v, BaseException)}
    assert sorted(errors.__all__) == sorted(classes)
    for name in classes:
        assert name in errors.__doc__, f"the docstring of osscar_hf.errors does not show {name}"
        assert getattr(osscar_hf, name) is getattr(errors, name) and name in osscar_hf.__all__


@pytest.mark.parametrize("module, names", [
    ("osscar_hf.cli", ["CommandError"]),
    ("osscar_hf.card", ["CardError"]),
    ("osscar_hf.activations", ["ActivationStorageError"]),
    ("osscar_hf.hub", ["HubPushError", "HubAuthenticationError", "HubPermissionError", "HubConnectionError"]),
    ("osscar_hf.io", ["SaveError"]),
    ("osscar_hf.io.save", ["SaveError", "OutputConflictError"]),
    ("osscar_hf.io.remote_code", ["RemoteCodeError"]),
    ("osscar_hf.integrations.quantizer", ["NotDequantizableError"]),
    ("osscar_hf.streaming", ["CheckpointError", "ResumeError", "ConcurrentRunError"]),
    ("osscar_hf.streaming.sources", ["CheckpointError"]),
    ("osscar_hf.streaming.resume", ["ResumeError"]),
    ("osscar_hf.streaming.lock", ["ConcurrentRunError"]),
])
def test_the_old_import_paths_still_work(module, names):
    imported = importlib.import_module(module)
    for name in names:
        assert getattr(imported, name) is getattr(errors, name)


def test_private_signals_stay_private():
    """The control-flow exceptions exempted above really are private and not errors callers can see."""
    for qualified in PRIVATE_SIGNALS:
        module, name = qualified.rsplit(".", 1)
        assert is_private(name) and not issubclass(getattr(importlib.import_module(module), name), errors.OsscarError)


# --------------------------------------------------------------------------- no private names across modules
def _bound_imports(source: str) -> dict[str, str]:
    """Names that module ``source`` binds to things imported from other package modules -> the qualified origin."""
    bound = {}
    for imp in imports_of(source):
        if not imp.names:
            continue
        for name in imp.names:
            bound[name] = f"{imp.target}.{name}"
    return bound


def private_uses(source: str) -> list[str]:
    """``module:line name`` for every private name ``source`` takes from another package module: imported by
    name, or read as an attribute of an imported module or class (``ShardReader._shapes``)."""
    found = [f"{source}:{imp.line} {imp.target}.{name}"
             for imp in imports_of(source) if imp.target != source for name in imp.names if is_private(name)]
    modules = {alias.asname or alias.name: alias.name for node in ast.walk(ast.parse(MODULES[source].read_text()))
               if isinstance(node, ast.Import) for alias in node.names if alias.name in MODULES}
    bound = {**_bound_imports(source), **modules}
    tree = ast.parse(MODULES[source].read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and is_private(node.attr) and isinstance(node.value, ast.Name)
                and node.value.id in bound):
            found.append(f"{source}:{node.lineno} {bound[node.value.id]}.{node.attr}")
    return found


def test_no_module_takes_a_private_name_from_another():
    found = [use for name in MODULES for use in private_uses(name)]
    assert found == [], "make these public (and documented) or move them where they are used: " + ", ".join(found)


def test_the_private_name_check_sees_imports_and_attributes(tmp_path, monkeypatch):
    """The check above finds a private import (also a relative, function-level one) and a private attribute."""
    fake = tmp_path / "fake.py"
    fake.write_text("from .hub import HubPushError\nfrom . import io\n\n\ndef f():\n    from .io.save import _x\n"
                    "    return HubPushError._y, io._z\n")
    monkeypatch.setitem(MODULES, "osscar_hf.fake", fake)
    assert sorted(private_uses("osscar_hf.fake")) == [
        "osscar_hf.fake:6 osscar_hf.io.save._x", "osscar_hf.fake:7 osscar_hf.hub.HubPushError._y",
    ]


# --------------------------------------------------------------------------- no import cycles
def test_the_package_has_no_import_cycle():
    cycles = find_cycles(import_graph())
    assert cycles == [], f"import cycles (module-level and function-level imports): {cycles}"


def test_the_cycle_check_sees_function_level_and_lazy_imports():
    graph = import_graph()
    assert "osscar_hf.config" in graph["osscar_hf"]  # from the lazy-export table of the package
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    integrations = {imp.target for imp in imports_of("osscar_hf.integrations") if imp.function_level}
    assert "osscar_hf.integrations.quantizer" in integrations  # imported inside register()
    assert _resolve_from("osscar_hf.streaming.run", ast.parse("from ..io import save").body[0]) == "osscar_hf.io"
    assert _resolve_from("osscar_hf.streaming", ast.parse("from .run import x").body[0]) == "osscar_hf.streaming.run"


def test_reading_the_version_from_the_package_would_be_a_cycle(tmp_path, monkeypatch):
    """``from osscar_hf import __version__`` inside a function of a module the package exports lazily (what config.py
    did) closes a cycle through the package ``__init__``; ``osscar_hf.version`` does not."""
    fake = tmp_path / "config.py"
    fake.write_text("def versions():\n    from osscar_hf import __version__\n    return __version__\n")
    monkeypatch.setitem(MODULES, "osscar_hf.config", fake)
    assert any({"osscar_hf", "osscar_hf.config"} <= set(cycle) for cycle in find_cycles(import_graph()))
    fake.write_text("from .version import __version__\n")
    assert find_cycles(import_graph()) == []


# --------------------------------------------------------------------------- loggers named after their modules
# ``cli`` attaches the command line's handler to the package's logger: configuration, not a place that logs.
PACKAGE_LOGGER_USERS = {"osscar_hf.cli"}


def logger_names(source: str) -> list[str]:
    """The argument of every ``logging.getLogger(...)`` call in ``source``, as source text."""
    tree = ast.parse(MODULES[source].read_text(encoding="utf-8"))
    return [ast.unparse(node.args[0]) if node.args else "" for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "getLogger"]


def root_logger_calls(source: str) -> list[int]:
    """Lines of ``logging.info(...)``-style calls, which log under the root logger instead of the module's."""
    tree = ast.parse(MODULES[source].read_text(encoding="utf-8"))
    levels = {"debug", "info", "warning", "error", "exception", "critical", "log"}
    return [node.lineno for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in levels
            and isinstance(node.func.value, ast.Name) and node.func.value.id == "logging"]


def test_every_logger_is_named_after_its_module():
    wrong = {}
    for name in MODULES:
        allowed = {"__name__"} | ({repr(PACKAGE)} if name in PACKAGE_LOGGER_USERS else set())
        names = [n for n in logger_names(name) if n not in allowed] + [f"root logger, line {line}"
                                                                        for line in root_logger_calls(name)]
        if names:
            wrong[name] = names
    assert wrong == {}, f"use logging.getLogger(__name__): {wrong}"


def test_model_loading_logs_under_the_module_that_loads(tmp_path, caplog):
    from osscar_hf.io.load import load_model_and_tokenizer
    from tests.conftest import make_model, make_tokenizer

    make_model("opt").save_pretrained(tmp_path)
    make_tokenizer().save_pretrained(tmp_path)
    with caplog.at_level("INFO", logger=PACKAGE):
        load_model_and_tokenizer(tmp_path, device="cpu")
    loading = [record for record in caplog.records if record.getMessage().startswith("Loading")]
    assert [record.name for record in loading] == ["osscar_hf.io.load"]


# --------------------------------------------------------------------------- function length
MAX_FUNCTION_LINES = 80


def long_functions(tree: ast.AST, limit: int = MAX_FUNCTION_LINES) -> list[tuple[str, int]]:
    """``(name, lines)`` of every function in ``tree`` longer than ``limit`` lines, docstring included."""
    return [(node.name, node.end_lineno - node.lineno + 1) for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= limit]


def test_long_functions_are_found() -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(85))
    assert long_functions(ast.parse(f"def long():\n{body}\n\ndef short():\n    pass\n")) == [("long", 86)]


def test_no_function_is_longer_than_a_screen() -> None:
    found = [f"{name}.{function} ({lines} lines)" for name, path in MODULES.items()
             for function, lines in long_functions(ast.parse(path.read_text(encoding="utf-8")))]
    assert not found, f"functions over {MAX_FUNCTION_LINES} lines: {found}"
