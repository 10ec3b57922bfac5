"""The seam to vLLM: every private or internal vLLM name the adapter uses, checked against the
installed vLLM (no engine). After a vLLM upgrade this test lists what moved or vanished."""

import ast
import importlib
import inspect
import re
from pathlib import Path

import pytest
import vllm

from vllm_specqd.adapter import vllm_internals
from vllm_specqd.adapter.vllm_internals import INTERNALS

VLLM_ROOT = Path(vllm.__file__).parent
PACKAGE = Path(importlib.import_module("vllm_specqd").__file__).parent
ADAPTER = PACKAGE / "adapter"
SEAM = {"vllm_internals.py", "patches.py"}
# Private names the seam uses on objects that are not vLLM's.
NOT_VLLM = {"_actions"}  # argparse.ArgumentParser._actions (patches.py #1)


def _owner(internal):
    module_name, _, class_name = internal.owner.partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, class_name) if class_name else module


def _assigned_in_source(owner, name: str) -> bool:
    if inspect.isfunction(owner):  # a name the function sets on its argument
        return re.search(rf"\.{name}\s*=", inspect.getsource(owner)) is not None
    classes = inspect.getmro(owner) if inspect.isclass(owner) else (owner,)
    for cls in classes:
        if cls is object:
            continue
        try:
            source = inspect.getsource(cls)
        except (OSError, TypeError):
            continue
        # An instance attribute (self.name = / self.name: T =) or a dataclass field (name: T).
        if re.search(rf"self\.{name}\s*[:=]|^\s+{name}:", source, re.MULTILINE):
            return True
    return False


@pytest.mark.parametrize("internal", INTERNALS, ids=lambda i: f"{i.owner.rpartition('.')[2]}.{i.name}")
def test_registered_name_exists_at_the_cited_line(internal):
    owner = _owner(internal)
    assert hasattr(owner, internal.name) or _assigned_in_source(owner, internal.name), (
        f"{internal.owner} no longer has {internal.name!r}"
    )
    path, _, line = internal.cite.partition(":")
    lines = (VLLM_ROOT / path).read_text().splitlines()
    assert internal.name in lines[int(line) - 1], f"{internal.cite} no longer mentions {internal.name!r}"


def _our_names() -> set[str]:
    """Names vllm-specqd defines itself: functions, methods, class attributes, self.X assignments."""
    names = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                if isinstance(node.value, ast.Name) and node.value.id == "self":
                    names.add(node.attr)
            elif isinstance(node, ast.AnnAssign | ast.Assign):
                for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    if isinstance(target, ast.Name):
                        names.add(target.id)
    return names


def _accessed_names(path: Path) -> set[str]:
    """Attribute names a module reads or writes: ``x.name`` and getattr/setattr/hasattr/delattr/_wrap
    with a literal name."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and len(node.args) >= 2:
            if node.func.id in ("getattr", "setattr", "hasattr", "delattr", "_wrap"):
                if isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str):
                    names.add(node.args[1].value)
    return names


def _private(names: set[str]) -> set[str]:
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


OURS = _our_names()
REGISTERED = {internal.name for internal in INTERNALS}


@pytest.mark.parametrize("path", sorted(ADAPTER.glob("*.py")), ids=lambda p: p.name)
def test_private_vllm_names_are_used_only_in_the_seam(path):
    used = _accessed_names(path)
    if path.name in SEAM:
        unregistered = _private(used) - OURS - REGISTERED - NOT_VLLM
        assert not unregistered, f"{path.name} uses private vLLM names missing from INTERNALS: {unregistered}"
    else:
        leaked = (_private(used) - OURS) | (used & (REGISTERED - OURS))
        assert not leaked, f"{path.name} reaches vLLM internals outside vllm_internals.py: {sorted(leaked)}"


def test_engine_free_modules_name_no_vllm_internal():
    for path in [*PACKAGE.glob("*.py"), *(PACKAGE / "bench").glob("*.py")]:
        leaked = _accessed_names(path) & (REGISTERED - OURS)
        assert not leaked, f"{path.name} reaches vLLM internals: {sorted(leaked)}"


def test_every_function_of_the_seam_cites_vllm():
    for name, function in inspect.getmembers(vllm_internals, inspect.isfunction):
        if function.__module__ == vllm_internals.__name__ and not name.startswith("_"):
            doc = inspect.getdoc(function) or ""
            assert ".py:" in doc or "no vLLM name" in doc, f"{name} cites no vLLM file:line"
