"""``lopt-convert``: upstream checkpoint <-> PyTorch weights, with a summary of what was written."""

from __future__ import annotations

import argparse
import ast
import hashlib
import os
import sys
import traceback
from collections.abc import Sequence
from typing import Any

from converters.convert import FORMATS, WEIGHTS_SUFFIXES, Converted, convert
from converters.errors import CheckpointError
from converters.origin import DECLARABLE
from converters.state import migrate_state
from converters.upstream import MAPPINGS
from lopt_port.provenance import NOTE_KEY, ORIGIN_KEY
from lopt_port.weights import WeightsError, loads_json, read_json_file

_SUFFIX = {"safetensors": ".safetensors", "pt": ".pt", "hf": "_hf", "upstream": "_upstream"}


def _parse_set(items: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name.strip():
            raise CheckpointError(f"--set expects name=value, got {item!r}")
        try:
            value = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            value = text.strip()
        out[name.strip()] = value
    return out


def _parse_decay_offsets(text: str | None) -> dict[str, Any] | str | None:
    """``--pylo-decay-offsets``: ``pylo`` or a JSON object of the three offsets."""
    if text is None or text == "pylo":
        return text
    try:
        value = loads_json(text, "--pylo-decay-offsets", "the value")
    except WeightsError as e:
        raise CheckpointError(f"--pylo-decay-offsets expects 'pylo' or a JSON object ({e})"
                              ) from None
    if not isinstance(value, dict):
        raise CheckpointError("--pylo-decay-offsets expects 'pylo' or a JSON object")
    return value


def default_output(src: str, fmt: str) -> str:
    """``<name><suffix>`` in the current folder, named after the checkpoint folder or file."""
    path = os.path.abspath(src)
    if os.path.isfile(path) and path.endswith(WEIGHTS_SUFFIXES):
        stem = os.path.splitext(os.path.basename(path))[0]
    elif os.path.isfile(path):
        stem = os.path.basename(os.path.dirname(path))
    else:
        stem = os.path.basename(path.rstrip(os.sep))
    return stem + _SUFFIX[fmt]


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _wrap_items(head: str, items: Sequence[str], width: int = 100) -> list[str]:
    """``items`` space-separated after ``head``, on lines of at most ``width`` characters where
    possible; an item is never split."""
    lines = [head]
    for item in items:
        if len(lines[-1]) > len(head) and len(lines[-1]) + 1 + len(item) > width:
            lines.append(" " * len(head))
        lines[-1] += item if len(lines[-1]) == len(head) else " " + item
    return lines


def summarize(converted: Converted, src: str, written: Sequence[str], fmt: str) -> str:
    """The human-readable report printed by the CLI."""
    meta = converted.metadata
    lines = [f"source    {src}"]
    if "source_sha256" in meta:
        lines.append(f"          from upstream file {meta.get('source_file')!r}, "
                     f"sha256 {meta['source_sha256']}")
    lines.append(f"kind      {converted.kind}")
    if ORIGIN_KEY in meta:
        lines.extend(_wrap_items("origin    ", f"{meta[ORIGIN_KEY]}: {meta.get(NOTE_KEY, '')}"
                                 .split()))
    lines.extend(_wrap_items("hparams   ", [f"{k}={v}" for k, v in converted.hparams.items()]))
    if "upstream_step" in meta:
        lines.append(f"upstream  gen_id={meta.get('upstream_gen_id')} "
                     f"step={meta.get('upstream_step')} "
                     f"round trip={meta.get('upstream_roundtrip', 'unknown')}")
    width = max(len(k) for k in converted.state_dict)
    lines.append(f"  {'tensor':<{width}}  {'shape':<12} {'dtype':<8} {'bytes':>10}")
    total_elems = total_bytes = 0
    for name, t in converted.state_dict.items():
        nbytes = t.numel() * t.element_size()
        total_elems += t.numel()
        total_bytes += nbytes
        lines.append(f"  {name:<{width}}  {tuple(t.shape)!s:<12} "
                     f"{str(t.dtype).removeprefix('torch.'):<8} {nbytes:>10,}")
    lines.append(f"  {len(converted.state_dict)} tensors, {total_elems:,} values, "
                 f"{total_bytes:,} bytes")
    for path in written:
        lines.append(f"wrote     {path} ({fmt}, {os.path.getsize(path):,} bytes, "
                     f"sha256 {_sha256(path)})")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lopt-convert",
        description="Convert a learned_optimization checkpoint (folder with 'params' and "
                    "'config.gin', or a 'params' file) to PyTorch weights, or converted "
                    "weights (.safetensors/.pt file, or a pretrained folder with config.json "
                    "and model.safetensors) to another format, upstream included.")
    parser.add_argument("src", help="upstream checkpoint folder or file, converted weights, "
                        "or a pylo weights folder")
    parser.add_argument("-o", "--output", help="output file (folder for --format hf and "
                        "upstream); default: named after SRC in the current folder")
    parser.add_argument("--format", choices=FORMATS, default="safetensors")
    parser.add_argument("--kind", choices=sorted(MAPPINGS),
                        help="optimizer kind, needed when SRC has no config.gin and the "
                             "leaves do not tell it")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="hyperparameter (Python literal), overriding config.gin; "
                             "repeatable")
    parser.add_argument("--origin", choices=DECLARABLE,
                        help="declare what the weights are (recorded in the metadata as "
                             "weights_origin) where lopt-port does not recognise the file; "
                             "refused where it contradicts a known sha256. 'fixture' makes "
                             "every optimizer built from them warn that they are not "
                             "meta-trained")
    parser.add_argument("--pylo-decay-offsets", metavar="pylo|JSON",
                        help="for a pylo MetaMLP folder (which stores no learned decay "
                             "offsets): 'pylo' takes pylo's hard-coded (μLO's) offsets, or a "
                             "JSON object gives momentum_decay_offsets, rms_decay_offsets and "
                             "adafactor_decay_offsets")
    parser.add_argument("--upstream-defaults", action="store_true",
                        help="without config.gin, fill hyperparameters that the weights "
                             "cannot tell with upstream's constructor defaults; a tuple-rooted "
                             "VeLO 'no_config' file first takes upstream's loader choices "
                             "(use_bugged_next_lstm_state=True, use_bugged_loss_features=True)")
    parser.add_argument("--state", metavar="NAMES_JSON",
                        help="SRC is an upstream optimizer state (flax msgpack, as written by "
                             "checkpoints.save_state); migrate it to lopt-port's optimizer "
                             "state, written as a torch file (default: <SRC>_state.pt). "
                             "NAMES_JSON maps each torch parameter name to its upstream "
                             "parameter: a key path 'a > b', a list of keys, or {\"path\": ..., "
                             "\"permute\": [axes]}")
    parser.add_argument("--force", action="store_true", help="replace an existing output")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def _migrate(args: argparse.Namespace) -> str:
    """``--state``: migrate, write, and the summary to print."""
    try:
        names = read_json_file(args.state)
    except WeightsError as e:
        raise CheckpointError(f"cannot read the names mapping ({e})") from None
    if not isinstance(names, dict):
        raise CheckpointError("the names mapping must be a JSON object", file=args.state)
    migrated = migrate_state(args.src, names, kind=args.kind)
    out = args.output or os.path.basename(os.path.abspath(args.src)) + "_state.pt"
    migrated.save(out, overwrite=args.force)
    lines = [f"source    {args.src}", f"kind      {migrated.kind}",
             f"iteration {migrated.iteration} (updates applied upstream)"]
    for name in sorted(migrated.state):
        st = migrated.state[name]
        shape = tuple(migrated.params[name].shape) if name in migrated.params else "?"
        lines.append(f"  {name:<30} {shape!s:<16} factored_dims={st['factored_dims']}")
    if migrated.global_state:
        lines.append(f"global    num_steps={migrated.global_state['num_steps']}")
    lines.append(f"wrote     {out}  sha256 {_sha256(out)}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns 0 on success, 2 on bad input, 1 on an internal error."""
    args = build_parser().parse_args(argv)
    try:
        if args.state is not None:
            print(_migrate(args))
            return 0
        hparams = _parse_set(args.set)
        converted = convert(args.src, args.kind, upstream_defaults=args.upstream_defaults,
                            origin=args.origin,
                            pylo_decay_offsets=_parse_decay_offsets(args.pylo_decay_offsets),
                            **hparams)
        out = args.output or default_output(args.src, args.format)
        written = converted.save(out, args.format, overwrite=args.force)
        print(summarize(converted, args.src, written, args.format))
    except (CheckpointError, WeightsError) as e:
        if args.debug:
            traceback.print_exc()
        print(f"lopt-convert: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        if args.debug:
            traceback.print_exc()
        print(f"lopt-convert: internal error ({type(e).__name__}): {e} "
              f"(rerun with --debug for the traceback)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
