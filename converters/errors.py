"""The one exception type the converters raise for bad input."""

from __future__ import annotations

from collections.abc import Sequence


def format_key_path(keys: Sequence[str]) -> str:
    """Render a chain of msgpack map keys as ``a > b > c`` (keys may contain ``/``)."""
    return " > ".join(keys) if keys else "<root>"


class CheckpointError(Exception):
    """A checkpoint, config or weights file could not be read, mapped or written.

    The message always names the file and, where one applies, the key path inside it.
    ``file`` and ``key_path`` are also available as attributes for tooling.
    """

    def __init__(self, message: str, *, file: str | None = None,
                 key_path: Sequence[str] | None = None) -> None:
        self.file = file
        self.key_path = tuple(key_path) if key_path is not None else None
        self.detail = message
        parts = []
        if file is not None:
            parts.append(str(file))
        if key_path is not None:
            parts.append(f"[{format_key_path(self.key_path)}]")
        prefix = " ".join(parts)
        super().__init__(f"{prefix}: {message}" if prefix else message)
