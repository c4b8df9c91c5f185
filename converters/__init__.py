"""Read upstream learned_optimization checkpoints and write PyTorch weights (and back).

Needs numpy, msgpack, safetensors, gin-config and torch; never JAX or flax.
"""

from converters.convert import FORMATS, Converted, convert
from converters.errors import CheckpointError
from converters.state import MigratedState, migrate_state
from converters.upstream import UpstreamCheckpoint, load_upstream

__all__ = ["FORMATS", "CheckpointError", "Converted", "MigratedState", "UpstreamCheckpoint",
           "convert", "load_upstream", "migrate_state"]
