"""The strict match of a state dict against the names and shapes its optimizer expects.

Every optimizer's config describes its weights as ``{name: shape}``
(``state_dict_shapes(...)``); this module compares a state dict with that description, the
same way for every kind: a name expected but absent, a name present with another shape, a
name not expected. Shapes only: no torch, any value with a ``.shape`` will do.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def shape_problems(expected: Mapping[str, tuple[int, ...]],
                   state_dict: Mapping[str, Any]) -> list[str]:
    """Every mismatch, as text: ``missing <name> <shape>`` and ``<name>: expected shape X,
    found Y`` in ``expected``'s order, then ``unexpected <name> <shape>`` in the state dict's
    order. Empty when the names and shapes agree exactly."""
    problems = []
    for name, shape in expected.items():
        if name not in state_dict:
            problems.append(f"missing {name} {shape}")
        elif tuple(state_dict[name].shape) != shape:
            problems.append(f"{name}: expected shape {shape}, found "
                            f"{tuple(state_dict[name].shape)}")
    problems += [f"unexpected {name} {tuple(value.shape)}" for name, value in state_dict.items()
                 if name not in expected]
    return problems


def check_shapes(expected: Mapping[str, tuple[int, ...]], state_dict: Mapping[str, Any],
                 heading: str) -> None:
    """Raise ``ValueError("<heading>: <problem>; <problem>; ...")`` listing every mismatch of
    :func:`shape_problems`; return quietly when there is none."""
    problems = shape_problems(expected, state_dict)
    if problems:
        raise ValueError(f"{heading}: " + "; ".join(problems))
