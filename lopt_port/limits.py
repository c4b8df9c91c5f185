"""Every limit the readers of untrusted files enforce, in one place (docs/conversion.md: Limits).

A checkpoint, ``config.gin``, ``config.json`` or weights file may come from anywhere, so every
reader bounds the work and memory a file can ask for and every recursive walk is bounded far
below Python's recursion limit (about 1,000 frames). A file past a limit is refused with the
reader's error type (:class:`~converters.errors.CheckpointError` or
:class:`~lopt_port.weights.WeightsError`), whose message names the file, the limit and its
value. The values are far above anything upstream or lopt-port writes.

:func:`json_depth_problem` lives here too: ``json.loads`` recurses once per level and would
otherwise hit the recursion limit on a deeply nested document, so the depth is scanned first.
"""

from __future__ import annotations

import re

#: Largest checkpoint or weights file read (flax msgpack, μLO pickle): upstream's largest
#: released learned optimizer (VeLO) is a few MB; a file is read into memory whole.
MAX_FILE_BYTES = 1 << 30
#: Largest text file read (``config.gin``, ``config.json``): upstream's are a few KB.
MAX_CONFIG_BYTES = 4 << 20
#: Deepest nesting of a checkpoint's tree of maps (msgpack, pickle): upstream's are 4 deep;
#: the readers recurse once per level.
MAX_TREE_DEPTH = 32
#: Most dimensions of an array in a checkpoint: the optimizers use at most 4.
MAX_NDIM = 16
#: Deepest bracket nesting of a JSON text (``hparams``, ``config.json``, layouts): lopt-port
#: writes at most about 2 * MAX_TREE_DEPTH levels; ``json.loads`` recurses once per level.
MAX_JSON_DEPTH = 100
#: Longest JSON text parsed from metadata (a string inside a file already bounded by
#: MAX_FILE_BYTES): ``upstream_layout``, the largest, is a few KB.
MAX_JSON_CHARS = 16 << 20
#: Deepest bracket nesting in a ``config.gin``, and deepest expansion of one of its values,
#: counting each macro reference and each list, tuple or dict it passes through: upstream's
#: configs use one or two levels; gin's parser and the expansion recurse once per level.
MAX_GIN_DEPTH = 64
#: Largest expansion of the ``config.gin`` values read, in values plus characters of strings,
#: all bindings together: macros referring to macros grow geometrically (ten references per
#: level make 10**8 values from a 1 KB file), so the size is computed before anything is
#: expanded. Upstream's configs expand to a few hundred.
MAX_GIN_EXPANSION = 1_000_000

_JSON_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.DOTALL)


def json_depth_problem(text: str) -> str | None:
    """Why ``text`` is beyond the JSON limits (its length, its bracket nesting outside
    strings), or None when it is within them; call it before ``json.loads``."""
    if len(text) > MAX_JSON_CHARS:
        return (f"JSON text of {len(text):,} characters is beyond MAX_JSON_CHARS = "
                f"{MAX_JSON_CHARS:,}")
    depth = 0
    for match in _JSON_TOKEN.finditer(text):
        token = match.group()
        if token in "[{":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                return f"JSON nests deeper than MAX_JSON_DEPTH = {MAX_JSON_DEPTH} levels"
        elif token in "]}":
            depth -= 1
    return None
