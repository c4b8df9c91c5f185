"""Read an upstream ``config.gin`` with gin-config's own parser, registering nothing.

Upstream's loader (``opt_from_checkpoint``) scopes every binding and instantiates the class
referenced by ``run_train.lopt``; the bindings of that class (``Class.arg = value``, scoped or
not) are its constructor arguments. The file also names many configurables we never register
(trainers, tasks), so statements are parsed one by one rather than bound.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

from gin import config_parser

from converters.errors import CheckpointError
from lopt_port.limits import MAX_CONFIG_BYTES, MAX_GIN_DEPTH, MAX_GIN_EXPANSION

#: A quoted string or a comment (whose brackets do not nest), or a bracket.
_GIN_TOKEN = re.compile(r""""(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*'|#[^\n]*|[\[\](){}]""")


@dataclass(frozen=True)
class _Reference:
    name: str
    evaluate: bool


@dataclass(frozen=True)
class _Macro:
    name: str


class _Delegate(config_parser.ParserDelegate):
    def configurable_reference(self, scoped_configurable_name: str, evaluate: bool) -> _Reference:
        return _Reference(scoped_configurable_name, evaluate)

    def macro(self, macro_name: str) -> _Macro:
        return _Macro(macro_name)


@dataclass
class GinConfig:
    """What a ``config.gin`` says about the learned optimizer."""

    lopt_class: str
    bindings: dict[str, Any] = field(default_factory=dict)
    text: str = ""


def _last(selector: str) -> str:
    return selector.rsplit(".", 1)[-1]


class _Expander:
    """Expands macros in binding values, bounded by MAX_GIN_DEPTH and MAX_GIN_EXPANSION.

    The size and height of every macro's expansion are computed (memoized, so a macro used
    ten times is measured once) before any value is expanded, so a file whose macros grow
    geometrically is refused without building anything.
    """

    def __init__(self, macros: dict[str, Any], file: str) -> None:
        self.macros = macros
        self.file = file
        self.measured: dict[str, tuple[int, int]] = {}
        self.total = 0

    def _fail(self, message: str, where: str) -> CheckpointError:
        return CheckpointError(f"{where}: {message}", file=self.file)

    def _measure(self, value: Any, stack: tuple[str, ...], where: str) -> tuple[int, int]:
        """``(size, height)`` of ``value`` expanded: values plus string characters, and
        nesting levels (macros and containers); ``stack`` holds a macro's name or ``""`` (a
        container) for each level being measured."""
        if len(stack) > MAX_GIN_DEPTH:
            raise self._fail(f"nests deeper than MAX_GIN_DEPTH = {MAX_GIN_DEPTH} levels "
                             f"(macros and containers)", where)
        if isinstance(value, _Macro):
            name = value.name
            if name in stack:
                raise self._fail(f"macro %{name} refers to itself", where)
            if name not in self.macros:
                raise self._fail(f"macro %{name} is not defined", where)
            if name not in self.measured:
                size, height = self._measure(self.macros[name], (*stack, name), f"macro %{name}")
                self.measured[name] = (size, height + 1)
            size, height = self.measured[name]
        elif isinstance(value, (list, tuple, dict)):
            items = (list(value.keys()) + list(value.values()) if isinstance(value, dict)
                     else value)
            size, height = 1, 0
            for item in items:
                item_size, item_height = self._measure(item, (*stack, ""), where)
                size += item_size
                height = max(height, item_height)
                if size > MAX_GIN_EXPANSION:
                    break
            height += 1
        else:
            size, height = 1 + (len(value) if isinstance(value, (str, bytes)) else 0), 0
        if size > MAX_GIN_EXPANSION:
            raise self._fail(f"expands to more than MAX_GIN_EXPANSION = {MAX_GIN_EXPANSION:,} "
                             f"values and characters", where)
        if height + len(stack) > MAX_GIN_DEPTH:
            raise self._fail(f"nests deeper than MAX_GIN_DEPTH = {MAX_GIN_DEPTH} levels "
                             f"(macros and containers)", where)
        return size, height

    def _expand(self, value: Any) -> Any:
        if isinstance(value, _Macro):
            return self._expand(self.macros[value.name])
        if isinstance(value, (list, tuple)):
            return type(value)(self._expand(v) for v in value)
        if isinstance(value, dict):
            return {k: self._expand(v) for k, v in value.items()}
        return value

    def resolve(self, value: Any, where: str) -> Any:
        """``value`` (bound to ``where``) with its macros expanded, once measured within the
        limits, all values resolved so far counted together."""
        size, _ = self._measure(value, (), where)
        self.total += size
        if self.total > MAX_GIN_EXPANSION:
            raise self._fail(f"the values read expand to more than MAX_GIN_EXPANSION = "
                             f"{MAX_GIN_EXPANSION:,} values and characters", where)
        return self._expand(value)


def _check_bracket_depth(text: str, file: str) -> None:
    """Refuse brackets nested deeper than MAX_GIN_DEPTH before gin's parser, which recurses
    once per level, sees them."""
    depth = 0
    for match in _GIN_TOKEN.finditer(text):
        token = match.group()
        if token in "([{":
            depth += 1
            if depth > MAX_GIN_DEPTH:
                line = text.count("\n", 0, match.start()) + 1
                raise CheckpointError(f"brackets nest deeper than MAX_GIN_DEPTH = "
                                      f"{MAX_GIN_DEPTH} levels at line {line}", file=file)
        elif token in ")]}":
            depth = max(depth - 1, 0)


def parse_gin(text: str, file: str = "config.gin") -> GinConfig:
    """Find the class behind ``run_train.lopt`` and collect its bindings.

    Bindings in the scope of the reference (``@scope/Class()``) override unscoped ones;
    macros (``%NAME``) are resolved. Raises :class:`CheckpointError` on syntax errors or when
    no learned optimizer is named.
    """
    _check_bracket_depth(text, file)
    statements = []
    try:
        for statement in config_parser.ConfigParser(text, _Delegate()):
            statements.append(statement)
    except SyntaxError as e:
        raise CheckpointError(f"gin syntax error at line {e.lineno}: {e.msg}", file=file) from None
    except Exception as e:  # gin's parser raises ValueError/TypeError for odd literals
        raise CheckpointError(f"gin parse error: {e}", file=file) from None
    bindings = [s for s in statements if isinstance(s, config_parser.BindingStatement)]
    macros = {s.selector: s.value for s in bindings if s.arg_name == "" and not s.scope}
    refs = [s for s in bindings if _last(s.selector) == "run_train" and s.arg_name == "lopt"]
    if not refs:
        raise CheckpointError("no 'run_train.lopt = @Class()' binding: cannot tell which "
                              "learned optimizer this is (pass the kind explicitly)", file=file)
    unscoped = [s for s in refs if not s.scope]
    expander = _Expander(macros, file)
    ref = expander.resolve((unscoped or refs)[-1].value, "run_train.lopt")
    if not isinstance(ref, _Reference):
        raise CheckpointError(f"run_train.lopt is {ref!r}, not a configurable reference",
                              file=file)
    ref_scope, _, cls = ref.name.rpartition("/")
    cls = _last(cls)
    found: dict[str, Any] = {}
    for scope in ("", ref_scope) if ref_scope else ("",):
        for s in bindings:
            if s.scope == scope and _last(s.selector) == cls and s.arg_name:
                value = expander.resolve(s.value, f"{cls}.{s.arg_name}")
                if isinstance(value, _Reference):
                    raise CheckpointError(f"{cls}.{s.arg_name} is bound to a configurable "
                                          f"(@{value.name}); only literal values are supported",
                                          file=file)
                found[s.arg_name] = value
    return GinConfig(cls, found, text)


def read_gin(path: str | os.PathLike) -> GinConfig:
    """Read and parse a ``config.gin`` file."""
    name = os.fspath(path)
    try:
        if os.path.getsize(name) > MAX_CONFIG_BYTES:
            raise CheckpointError(f"config is larger than MAX_CONFIG_BYTES = "
                                  f"{MAX_CONFIG_BYTES:,} bytes", file=name)
        with open(name, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise CheckpointError(f"cannot read: {e.strerror or e}", file=name) from None
    except UnicodeDecodeError:
        raise CheckpointError("config is not UTF-8 text", file=name) from None
    return parse_gin(text, name)
