"""Attacks on an erased model: one interface (:class:`Attack`), one resumable loop (:func:`run_attack`).

Adding an attack: a module here with an :class:`Attack` subclass (``settings``, ``prepare``,
``attack_one``), and one line in :data:`ATTACKS` (docs/architecture.md, "Adding an attack").
"""

from __future__ import annotations

from .base import Attack, Record, asr, run_attack, stale_records
from .concept_inversion import ConceptInversion
from .mma import MMADiffusion
from .p4d import P4D
from .replay import Replay
from .ring_a_bell import RingABell
from .unlearndiff import UnlearnDiff

#: Every attack by name (``evaluate.py --attack_method``).
ATTACKS: dict[str, type[Attack]] = {
    UnlearnDiff.name: UnlearnDiff,
    ConceptInversion.name: ConceptInversion,
    P4D.name: P4D,
    RingABell.name: RingABell,
    MMADiffusion.name: MMADiffusion,
    Replay.name: Replay,
}

__all__ = ["ATTACKS", "Attack", "ConceptInversion", "MMADiffusion", "P4D", "Record", "Replay", "RingABell",
           "UnlearnDiff", "asr", "run_attack", "stale_records"]
