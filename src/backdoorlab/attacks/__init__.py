"""Attacks: data poisoning (BadNets, Blended) and the clean baseline ``none``."""

from .badnets import BadNets
from .base import ATTACKS, Attack, PoisonedSplit
from .blended import Blended
from .none import NoAttack

ATTACKS.register("badnets")(BadNets)
ATTACKS.register("blended")(Blended)
ATTACKS.register("none")(NoAttack)

__all__ = ["ATTACKS", "Attack", "BadNets", "Blended", "NoAttack", "PoisonedSplit"]
