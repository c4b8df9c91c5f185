"""JAX references of the learned optimizers (import needs the ``jax`` extra)."""

from parity.reference.celo import CeloScheduler
from parity.reference.small_fc_lopt import SmallFCLOptReference
from parity.reference.velo import VeLOReference

__all__ = ["CeloScheduler", "SmallFCLOptReference", "VeLOReference"]
