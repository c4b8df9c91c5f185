"""The dependency rules between the three parts, read statically from every file's imports.

DESIGN.md: dependencies point one way (``parity -> lopt_port``, ``parity -> converters``,
``converters -> lopt_port``'s configs and weights I/O), and the JAX reference imports nothing
from ``lopt_port``, so that no bug can be shared by the thing checked and the check. The
imports are parsed with :mod:`ast`, never executed: ``lopt_port/__init__.py`` imports every
optimizer, so what a module pulls in at run time says nothing about what it names itself.

Every import counts: ``import a.b``, ``from a import b`` (``a.b`` when that is a module of
this repository, else ``a``), relative imports resolved against the file's package, imports
inside functions or under ``TYPE_CHECKING``, and ``importlib.import_module("a.b")`` /
``__import__("a.b")`` with a literal name.
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("lopt_port", "converters", "parity")

#: The only ``lopt_port`` modules the converters may import: the configs (shapes and
#: hyperparameters), the state layout, the weights files and their origin, the value rules,
#: the version and the readers' limits.
CONVERTERS_MAY_IMPORT = frozenset(f"lopt_port.{m}" for m in (
    "small_fc_lopt_config", "mulo_config", "velo_config", "celo_config", "constants",
    "state_layout", "weights", "provenance", "pylo_layout", "value_rules", "version", "limits"))
#: Top-level packages the product and the converters never import (JAX is parity's alone).
JAX_STACK = frozenset({"jax", "jaxlib", "flax", "optax"})


def module_name(path: str) -> str:
    """``a/b/c.py`` -> ``a.b.c``; ``a/b/__init__.py`` -> ``a.b``."""
    parts = Path(path).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_repo_module(name: str) -> bool:
    """Whether ``name`` is a module or package of this repository."""
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _from_base(node: ast.ImportFrom, path: str) -> str:
    """The absolute module a ``from ... import`` names (relative ones against ``path``'s
    package: level 1 is the package itself, each further level one package up)."""
    if not node.level:
        return node.module or ""
    package = module_name(path).split(".")
    if not path.endswith("__init__.py"):
        package = package[:-1]
    base = package[:len(package) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def imported_modules(source: str, path: str) -> Iterator[tuple[int, str]]:
    """``(line, module)`` for every import of ``source`` (the file ``path``, relative to the
    repository root), anywhere in it."""
    for node in ast.walk(ast.parse(source, filename=path)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = _from_base(node, path)
            for alias in node.names:
                sub = f"{base}.{alias.name}" if base else alias.name
                yield node.lineno, sub if not base or _is_repo_module(sub) else base
        elif (isinstance(node, ast.Call) and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
              and ast.unparse(node.func) in ("importlib.import_module", "__import__")):
            yield node.lineno, node.args[0].value


def _reference_rule(module: str) -> str | None:
    if module.split(".")[0] == "lopt_port":
        return "parity/reference/ imports nothing from lopt_port (the check stands alone)"
    return None


def _lopt_port_rule(module: str) -> str | None:
    top = module.split(".")[0]
    if top in {"parity", "converters"} or top in JAX_STACK:
        return ("lopt_port/ never imports parity, converters, jax, jaxlib, flax or optax "
                "(training needs torch alone)")
    return None


def _converters_rule(module: str) -> str | None:
    top = module.split(".")[0]
    if top == "lopt_port" and module not in CONVERTERS_MAY_IMPORT:
        return ("converters/ import from lopt_port only "
                + ", ".join(sorted(CONVERTERS_MAY_IMPORT)) + " (configs and weights I/O)")
    if top == "parity" or top in JAX_STACK:
        return "converters/ never import parity, jax, jaxlib, flax or optax"
    return None


def _rule_for(path: str) -> Callable[[str], str | None] | None:
    """The rule of the part ``path`` lies in (``parity/`` outside the reference may import
    converters and lopt_port: no rule)."""
    if path.startswith("parity/reference/"):
        return _reference_rule
    if path.startswith("lopt_port/"):
        return _lopt_port_rule
    if path.startswith("converters/"):
        return _converters_rule
    return None


def violations(path: str, source: str) -> list[str]:
    """``<path>:<line>: imports <module>: <rule>`` for every import the rules forbid."""
    rule = _rule_for(path)
    if rule is None:
        return []
    found = []
    for line, module in imported_modules(source, path):
        broken = rule(module)
        if broken is not None:
            found.append(f"{path}:{line}: imports {module}: {broken}")
    return found


def _sources() -> list[str]:
    return sorted(p.relative_to(ROOT).as_posix() for part in PARTS
                  for p in (ROOT / part).rglob("*.py"))


def test_every_file_keeps_the_import_rules() -> None:
    files = _sources()
    assert any(f.startswith("parity/reference/") for f in files)
    found = [v for f in files for v in violations(f, (ROOT / f).read_text(encoding="utf-8"))]
    assert not found, "\n".join(found)


@pytest.mark.parametrize(("path", "source", "line", "module"), [
    ("parity/reference/x.py", "import jax\n\ndef f():\n    import lopt_port.velo\n", 4,
     "lopt_port.velo"),
    ("parity/reference/x.py", "from ...lopt_port import state_layout\n", 1,
     "lopt_port.state_layout"),
    ("converters/x.py", "import lopt_port\n", 1, "lopt_port"),
    ("converters/x.py", "from lopt_port import __version__, celo_config\n", 1, "lopt_port"),
    ("converters/x.py", "from lopt_port.velo_config import KIND\nfrom lopt_port.velo import VeLO\n",
     2, "lopt_port.velo"),
    ("converters/x.py", "import importlib\nimportlib.import_module('parity.reference')\n", 2,
     "parity.reference"),
    ("lopt_port/x.py", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
     "    import jax.numpy as jnp\n", 3, "jax.numpy"),
    ("lopt_port/x.py", "from . import constants\nfrom .. import converters\n", 2, "converters"),
    ("lopt_port/x.py", "def f():\n    return __import__('optax')\n", 2, "optax"),
])
def test_a_forbidden_import_is_caught(path: str, source: str, line: int, module: str) -> None:
    found = violations(path, source)
    assert len(found) == 1 and found[0].startswith(f"{path}:{line}: imports {module}: "), found


@pytest.mark.parametrize(("path", "source"), [
    ("parity/harness.py", "import lopt_port\nfrom converters import convert\nimport jax\n"),
    ("parity/reference/x.py", "import jax.numpy as jnp\nfrom converters import flax_msgpack\n"
     "from parity.reference.upstream_rules import factored_dims\n"),
    ("converters/x.py", "from lopt_port import celo_config, velo_config\n"
     "from lopt_port.version import __version__\nfrom lopt_port.weights import WeightsError\n"),
    ("lopt_port/x.py", "import torch\nfrom lopt_port import velo_config\nfrom . import weights\n"),
])
def test_an_allowed_import_passes(path: str, source: str) -> None:
    assert violations(path, source) == []


@pytest.mark.parametrize(("path", "source", "modules"), [
    ("parity/reference/__init__.py", "from . import velo\nfrom .. import harness\n",
     ["parity.reference.velo", "parity.harness"]),
    ("parity/reference/celo.py", "from .velo import F32\nfrom . import velo\n",
     ["parity.reference.velo", "parity.reference.velo"]),
    ("lopt_port/velo.py", "from .constants import VELO_GRAD_CLIP\nfrom . import velo_config\n",
     ["lopt_port.constants", "lopt_port.velo_config"]),
    ("converters/x.py", "import numpy as np, lopt_port.weights\nfrom lopt_port import VeLO\n",
     ["numpy", "lopt_port.weights", "lopt_port"]),
])
def test_relative_and_from_imports_resolve(path: str, source: str, modules: list[str]) -> None:
    assert [m for _, m in imported_modules(source, path)] == modules
