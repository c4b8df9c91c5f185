"""Read an upstream ``config.gin`` with gin-config's own parser, registering nothing.

Upstream's loader (``opt_from_checkpoint``) scopes every binding and instantiates the class
referenced by ``run_train.lopt``; the bindings of that class (``Class.arg = value``, scoped or
not) are its constructor arguments. The file also names many configurables we never register
(trainers, tasks), so statements are parsed one by one rather than bound.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from gin import config_parser

from converters.errors import CheckpointError

MAX_CONFIG_BYTES = 4 << 20


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


def _resolve(value: Any, macros: dict[str, Any], file: str, seen: tuple[str, ...] = ()) -> Any:
    if isinstance(value, _Macro):
        if value.name in seen:
            raise CheckpointError(f"macro %{value.name} refers to itself", file=file)
        if value.name not in macros:
            raise CheckpointError(f"macro %{value.name} is not defined", file=file)
        return _resolve(macros[value.name], macros, file, (*seen, value.name))
    if isinstance(value, (list, tuple)):
        return type(value)(_resolve(v, macros, file, seen) for v in value)
    if isinstance(value, dict):
        return {k: _resolve(v, macros, file, seen) for k, v in value.items()}
    return value


def parse_gin(text: str, file: str = "config.gin") -> GinConfig:
    """Find the class behind ``run_train.lopt`` and collect its bindings.

    Bindings in the scope of the reference (``@scope/Class()``) override unscoped ones;
    macros (``%NAME``) are resolved. Raises :class:`CheckpointError` on syntax errors or when
    no learned optimizer is named.
    """
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
    ref = _resolve((unscoped or refs)[-1].value, macros, file)
    if not isinstance(ref, _Reference):
        raise CheckpointError(f"run_train.lopt is {ref!r}, not a configurable reference",
                              file=file)
    ref_scope, _, cls = ref.name.rpartition("/")
    cls = _last(cls)
    found: dict[str, Any] = {}
    for scope in ("", ref_scope) if ref_scope else ("",):
        for s in bindings:
            if s.scope == scope and _last(s.selector) == cls and s.arg_name:
                value = _resolve(s.value, macros, file)
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
            raise CheckpointError(f"config is larger than {MAX_CONFIG_BYTES} bytes", file=name)
        with open(name, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise CheckpointError(f"cannot read: {e.strerror or e}", file=name) from None
    except UnicodeDecodeError:
        raise CheckpointError("config is not UTF-8 text", file=name) from None
    return parse_gin(text, name)
