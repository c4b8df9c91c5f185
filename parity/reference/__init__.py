"""JAX references of the learned optimizers (import needs the ``jax`` extra)."""

from parity.reference.celo import CeloReference, CeloScheduler
from parity.reference.mulo import MuLOReference
from parity.reference.small_fc_lopt import SmallFCLOptReference
from parity.reference.velo import VeLOReference

__all__ = ["CeloReference", "CeloScheduler", "MuLOReference", "SmallFCLOptReference",
           "VeLOReference"]
