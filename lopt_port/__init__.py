"""lopt-port: learned optimizers from google/learned_optimization as torch.optim optimizers."""

from lopt_port.celo import Celo
from lopt_port.celo_adam import CeloAdam
from lopt_port.mulo import MuLO, mup_scales
from lopt_port.pretrained import from_pretrained, load_pretrained
from lopt_port.small_fc_lopt import SmallFCLOpt
from lopt_port.velo import VeLO
from lopt_port.version import __version__
from lopt_port.weights import LoadedWeights, WeightsError, load_pylo, load_weights

__all__ = ["Celo", "CeloAdam", "LoadedWeights", "MuLO", "SmallFCLOpt", "VeLO", "WeightsError",
           "__version__", "from_pretrained", "load_pretrained", "load_pylo", "load_weights",
           "mup_scales"]
