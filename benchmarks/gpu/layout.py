"""Import ``vllm_specqd`` from this checkout without installing it, ``kernels/`` as ``vllm_specqd.kernels``.

pyproject.toml ships ``kernels/`` as ``vllm_specqd.kernels`` (``[tool.setuptools] package-dir``). An
installed or editable package resolves that name; a bare checkout on ``sys.path`` does not, and the
lent GPU machine has torch and Triton but neither vLLM nor this package (nor a network to install it
from). :func:`install` adds a finder that serves each ``package-dir`` entry from the checkout, as
setuptools' editable finder does: after every other finder when this package is imported (an installed
copy still wins), ahead of them in the GPU session's processes (``site/sitecustomize.py``).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]


def package_dirs(pyproject: Path = REPO / "pyproject.toml") -> dict[str, Path]:
    """``{dotted package name: its directory}`` from pyproject's ``[tool.setuptools] package-dir``."""
    with open(pyproject, "rb") as f:
        table = tomllib.load(f)["tool"]["setuptools"]["package-dir"]
    return {name: (pyproject.parent / where).resolve() for name, where in table.items() if name}


class PackageDirFinder(importlib.abc.MetaPathFinder):
    """Finds the packages of a ``package-dir`` table in their directories."""

    def __init__(self, dirs: dict[str, Path]):
        self.dirs = dict(dirs)

    def find_spec(self, fullname, path=None, target=None):
        where = self.dirs.get(fullname)
        if where is None or not (where / "__init__.py").is_file():
            return None
        return importlib.util.spec_from_file_location(
            fullname, where / "__init__.py", submodule_search_locations=[str(where)]
        )


def install(pyproject: Path = REPO / "pyproject.toml", first: bool = False) -> PackageDirFinder:
    """Add the checkout's finder to ``sys.meta_path`` once (``first``: ahead of every finder); returns it.

    Appended, an installed ``vllm_specqd`` still wins; first, the checkout wins over anything on the path
    (the GPU session's processes: ``site/sitecustomize.py``)."""
    finder = next((f for f in sys.meta_path if isinstance(f, PackageDirFinder)), None)
    if finder is None:
        finder = PackageDirFinder(package_dirs(pyproject))
    elif first and sys.meta_path[0] is not finder:
        sys.meta_path.remove(finder)
    else:
        return finder
    if first:
        sys.meta_path.insert(0, finder)
    else:
        sys.meta_path.append(finder)
    return finder


def repo_module(folder: str, name: str) -> ModuleType:
    """Import the script-style module ``name`` from the checkout's ``folder`` (``benchmarks``, ``tests``)."""
    where = str(REPO / folder)
    if where not in sys.path:
        sys.path.insert(0, where)
    return importlib.import_module(name)
