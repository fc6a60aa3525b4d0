"""Attacks: data poisoning (BadNets, Blended, SIG, LF, ...), training-control attacks that poison each batch on
the fly (WaNet, Input-aware, BPP), the clean baseline ``none``, and backdoors that wake up on
compression (``qcb``/``quant-conditioned``, ``pqbackdoor``, ``prune-conditioned``)."""

from .adaptive import AdaptiveBlend, AdaptivePatch
from .badnets import BadNets
from .base import ASSETS, ATTACKS, Attack, PoisonedSplit
from .blended import Blended
from .bpp import Bpp
from .cassock import Cassock, content_trigger
from .conditioned import PQBackdoor, PruneConditioned, QuantConditioned
from .dfb import DFB, dfb_trigger
from .filters import FilterTrigger
from .input_aware import InputAware, pretrain_mask
from .lc import LabelConsistent, lc_adversarial
from .lf import LowFrequency, lf_trigger
from .lsp import LSP
from .none import NoAttack
from .refool import Refool, refool_pool
from .shapes import ObjectTrigger, PolygonTrigger
from .sig import SIG
from .trojannn import TrojanNN, trojannn_trigger
from .wanet import WaNet

ATTACKS.register("badnets")(BadNets)
ATTACKS.register("blended")(Blended)
ATTACKS.register("none")(NoAttack)
ATTACKS.register("qcb")(QuantConditioned)
ATTACKS.register("quant-conditioned")(QuantConditioned)
ATTACKS.register("pqbackdoor")(PQBackdoor)
ATTACKS.register("prune-conditioned")(PruneConditioned)
ATTACKS.register("filter")(FilterTrigger)
ATTACKS.register("polygon")(PolygonTrigger)
ATTACKS.register("object")(ObjectTrigger)
ATTACKS.register("adaptive-blend")(AdaptiveBlend)
ATTACKS.register("adaptive-patch")(AdaptivePatch)
ATTACKS.register("wanet")(WaNet)
ATTACKS.register("input-aware")(InputAware)
ASSETS.register("input-aware-mask")(pretrain_mask)
ATTACKS.register("sig")(SIG)
ATTACKS.register("lf")(LowFrequency)
ASSETS.register("lf-trigger")(lf_trigger)
ATTACKS.register("bpp")(Bpp)

__all__ = ["ATTACKS", "Attack", "BadNets", "Blended", "Bpp", "InputAware", "LowFrequency", "NoAttack", "PQBackdoor",
           "PoisonedSplit", "PruneConditioned", "QuantConditioned", "SIG", "WaNet"]
__all__ += ["AdaptiveBlend", "AdaptivePatch", "FilterTrigger", "ObjectTrigger", "PolygonTrigger"]
ATTACKS.register("lc")(LabelConsistent)
ASSETS.register("lc-adversarial")(lc_adversarial)
ATTACKS.register("trojannn")(TrojanNN)
ASSETS.register("trojannn-trigger")(trojannn_trigger)
ATTACKS.register("refool")(Refool)
ASSETS.register("refool-pool")(refool_pool)
__all__ += ["LabelConsistent", "Refool", "TrojanNN"]
ATTACKS.register("lsp")(LSP)
ATTACKS.register("cassock")(Cassock)
ASSETS.register("cassock-content")(content_trigger)
ATTACKS.register("dfb")(DFB)
ASSETS.register("dfb-trigger")(dfb_trigger)
__all__ += ["DFB", "LSP", "Cassock"]
from .blind import Blind  # noqa: E402

ATTACKS.register("blind")(Blind)
__all__ += ["Blind"]
from .ssba import Ssba, ssba_encoder  # noqa: E402

ATTACKS.register("ssba")(Ssba)
ASSETS.register("ssba-encoder")(ssba_encoder)
__all__ += ["Ssba"]
