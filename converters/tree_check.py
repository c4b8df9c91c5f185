"""Strict comparison of a decoded theta tree against the leaves a mapping expects.

Shared by every mapping module so that all optimizers report problems the same way:
``missing <chain> <shape>``, ``<chain>: expected shape X, found Y``, ``unexpected <chain>``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from converters.errors import format_key_path

Chain = tuple[str, ...]

#: How many problems an error message lists before it summarizes the rest.
MAX_LISTED = 12


def leaf_problems(flat: Mapping[Chain, Any], expected: Mapping[Chain, tuple[int, ...]],
                  shown: Mapping[Chain, Chain] | None = None) -> list[str]:
    """Every way ``flat`` (key chain -> leaf) differs from ``expected`` (key chain -> shape).

    Leaves must be float arrays of exactly the expected shape; chains not expected are
    reported too. ``shown`` maps a chain to the chain to print for it, for trees whose keys
    were canonicalized before the comparison (default: the chain itself).
    """
    shown = shown or {}

    def name(chain: Chain) -> str:
        return format_key_path(shown.get(chain, chain))

    problems = []
    for chain, shape in expected.items():
        value = flat.get(chain)
        if chain not in flat:
            problems.append(f"missing {name(chain)} {shape}")
        elif not isinstance(value, np.ndarray):
            problems.append(f"{name(chain)} is a {type(value).__name__}, not an array")
        elif tuple(value.shape) != shape:
            problems.append(f"{name(chain)}: expected shape {shape}, found {tuple(value.shape)}")
        elif value.dtype.kind != "f":
            problems.append(f"{name(chain)}: expected a float array, found {value.dtype.name}")
    for chain, value in flat.items():
        if chain not in expected:
            problems.append(f"unexpected {name(chain)} {getattr(value, 'shape', value)!r}")
    return problems


def join_problems(problems: list[str], limit: int = MAX_LISTED) -> str:
    """``"; "``-joined problems, the first ``limit`` of them, then a count of the rest."""
    more = f"; ... {len(problems) - limit} more" if len(problems) > limit else ""
    return "; ".join(problems[:limit]) + more
