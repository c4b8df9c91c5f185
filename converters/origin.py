"""What ``lopt-convert`` records of an upstream checkpoint's origin (:mod:`lopt_port.provenance`).

In order:

1. the sha256 of the theta file is one of :data:`lopt_port.provenance.KNOWN_SOURCES` (the
   bundled fixtures, the full-size VeLO fixture, the Celo authors' two releases): what that
   table says. An origin declared by the user that contradicts it is refused;
2. an origin declared by the user (``lopt-convert --origin``): recorded as declared;
3. the **released VeLO layout** (:func:`is_velo_release_layout`): ``release``, with a note
   that the content hash of the release is not known here, so only the layout was checked;
4. otherwise ``unknown``.
"""

from __future__ import annotations

from lopt_port import velo_config
from lopt_port.provenance import KNOWN_SOURCES, NOTE_KEY, ORIGIN_KEY

#: Origins a user may declare (``pylo-copy`` is set by the pylo reader only).
DECLARABLE = ("fixture", "release", "unknown")

#: The released VeLO: ``prefab``'s default optimizer, published (with its ``config.gin``) in
#: upstream's public bucket under this folder (upstream-spec 1.4).
VELO_RELEASE_PATH = ("gs://gresearch/learned_optimization/pretrained_lopts/"
                     "aug12_continue_on_bigger_2xbs_200kstep_bigproblem_v2_5620/")
#: Its ``params`` file's size: H=512, K=256, F=30, a 32-character gen_id and step 5620
#: (upstream-spec 1.4; ../shared/golden/README.md, "VeLO params size").
VELO_RELEASE_BYTES = 9_282_564
#: The ``HyperV2`` bindings of its ``config.gin`` that differ from the constructor's defaults.
VELO_RELEASE_BINDINGS = {"lstm_hidden_size": 512, "param_inits": 256,
                         "use_bugged_loss_features": False}
VELO_RELEASE_NOTE = (
    "the released VeLO's layout (HyperV2 lstm_hidden_size=512, param_inits=256, "
    "use_bugged_loss_features=False, every other argument at its default, config.gin present, "
    f"params {VELO_RELEASE_BYTES:,} bytes; published under {VELO_RELEASE_PATH}); the "
    "release's content hash is not known here, so the values themselves were not verified")


def velo_release_hparams() -> dict:
    """The released VeLO's hyperparameters as the converter resolves them."""
    return velo_config.normalize_hparams({**velo_config.UPSTREAM_DEFAULTS,
                                          **velo_config.EXTENSION_DEFAULTS,
                                          **VELO_RELEASE_BINDINGS})


def is_velo_release_layout(kind: str, hparams: dict, size: int, has_config: bool) -> bool:
    """Whether a checkpoint has the released VeLO's architecture, ``config.gin`` bindings (as
    resolved: every hyperparameter equal) and ``params`` size."""
    return (kind == velo_config.KIND and has_config and size == VELO_RELEASE_BYTES
            and hparams == velo_release_hparams())


def classify(sha256: str, kind: str, hparams: dict, size: int, has_config: bool,
             declared: str | None = None) -> dict[str, str]:
    """The ``weights_origin`` and ``weights_origin_note`` metadata of an upstream theta file
    (module docstring); ``ValueError`` for a declared origin that is not :data:`DECLARABLE`
    or that contradicts a known hash."""
    if declared is not None and declared not in DECLARABLE:
        raise ValueError(f"origin {declared!r} cannot be declared (one of "
                         f"{', '.join(DECLARABLE)})")
    known = KNOWN_SOURCES.get(sha256)
    if known is not None:
        if declared not in (None, known[0]):
            raise ValueError(f"origin declared {declared!r}, but the file's sha256 is that of "
                             f"a known {known[0]}: {known[1]}")
        origin, note = known
    elif declared is not None:
        origin, note = declared, "declared by the user at conversion (lopt-convert --origin)"
    elif is_velo_release_layout(kind, hparams, size, has_config):
        origin, note = "release", VELO_RELEASE_NOTE
    else:
        origin, note = "unknown", "not a file lopt-port knows by its sha256 or layout"
    return {ORIGIN_KEY: origin, NOTE_KEY: note}
