"""What converted weights are: meta-trained releases, test fixtures, or not known.

A converted file's metadata may carry ``weights_origin``, one of :data:`ORIGINS`, and
``weights_origin_note``, a sentence saying how that was decided:

=============  ==============================================================================
origin         meaning
=============  ==============================================================================
``fixture``    a test fixture (upstream init plus seeded noise): **not meta-trained**, faithful
               to upstream's math but useless for training
``release``    a known meta-trained release (recognised by its content hash, or by the
               released layout where no hash is known: the note says which)
``pylo-copy``  converted from pylo's copy of a release, which records no upstream provenance
``unknown``    none of the above could be established
=============  ==============================================================================

Files written before the field existed (format version 1 all the same: the field is optional
and older readers ignore it) are classified by :func:`origin_of` from their ``source_sha256``
when it is one of :data:`KNOWN_SOURCES`, else as ``unknown``.
"""

from __future__ import annotations

from collections.abc import Mapping

ORIGIN_KEY = "weights_origin"
NOTE_KEY = "weights_origin_note"
ORIGINS = ("fixture", "release", "pylo-copy", "unknown")

_FIXTURE = ("lopt-port test fixture {}: upstream init plus seeded noise, not meta-trained "
            "(checkpoints/README.md)")
#: sha256 of an upstream theta file -> (origin, note). The bundled fixtures and the full-size
#: VeLO fixture beside the clone (``../shared/golden/checkpoints/velo_full``), and the Celo
#: authors' two releases (sha256 listed in checkpoints/README.md).
KNOWN_SOURCES: dict[str, tuple[str, str]] = {
    "3abb8bbe49645d26d579b684222e438729da6d3b135797d38db55ca0ea08da9c":
        ("fixture", _FIXTURE.format("small_fc_h32_sm0p01/params")),
    "b98655fb29f00a26812a0e03790c6ea036ecc7fea633082db5d38345cfe52b8a":
        ("fixture", _FIXTURE.format("small_fc_h32_default/params")),
    "cb210f1e3e5927b9203285563462c5a0fe44cc2e9418307de79c3443266ab3e7":
        ("fixture", _FIXTURE.format("velo_small/params")),
    "996ad692975fb54f1ff07e052bf70fd3f35dd32b8f25b2732dd4682944a469a3":
        ("fixture", _FIXTURE.format("mulo_h32_sm0p01/params")),
    "c7411919f44881a4b79efc051e4ca78ad77828067996bcd626aaf568d5e13e78":
        ("fixture", _FIXTURE.format("velo_full/params (the released VeLO's layout and size)")),
    "35683c6123069c101d62ec1f8b2e6d70d50a43e67ebe09953b27620a7dcb836b":
        ("release", "Celo, meta-trained and released by its authors (amoudgl/celo, "
                    "arXiv 2501.12670); sha256 of theta.state matched"),
    "99c65fa0218a739c32eac4e8a99523b6fed92e2926d0c5d64e83835637b75d38":
        ("release", "Celo-Adam, meta-trained and released by its authors (amoudgl/celo-adam, "
                    "arXiv 2501.12670); sha256 of theta.state matched"),
}


def origin_of(metadata: Mapping[str, str]) -> tuple[str, str]:
    """``(origin, note)`` of weights with this metadata: the recorded ``weights_origin`` (and
    its note), else what :data:`KNOWN_SOURCES` says of ``source_sha256``, else
    ``("unknown", "")``. A recorded value outside :data:`ORIGINS` raises ``ValueError``."""
    recorded = metadata.get(ORIGIN_KEY)
    if recorded is not None:
        if recorded not in ORIGINS:
            raise ValueError(f"metadata {ORIGIN_KEY} is {recorded!r}, expected one of "
                             f"{', '.join(ORIGINS)}")
        return recorded, metadata.get(NOTE_KEY, "")
    return KNOWN_SOURCES.get(metadata.get("source_sha256", ""), ("unknown", ""))


def fixture_warning(optimizer: str, note: str) -> str:
    """The text of the warning given when an optimizer is built from fixture weights."""
    return (f"{optimizer}: these weights are a TEST FIXTURE, NOT META-TRAINED ({note}). They "
            f"reproduce upstream's math for the parity tests; training with them will not "
            f"work. Convert a meta-trained release instead (README: Known releases).")
