"""What to keep: one file per method, pure tensor logic. Register a new method in ``mmprune/registry.py``."""

from mmprune.methods.base import (
    POSITION_POLICIES,
    HybridPruner,
    InLLMPruner,
    MultiStagePruner,
    PreLLMPruner,
    Pruner,
    SingleStagePruner,
    VideoPruner,
)
from mmprune.methods.cdpruner import CDPrunerPruner
from mmprune.methods.cluster import ClusterPruner
from mmprune.methods.dart import DARTPruner
from mmprune.methods.divprune import DivPrunePruner
from mmprune.methods.dycoke import DyCokePruner
from mmprune.methods.evs import EVSPruner
from mmprune.methods.fastervlm import FasterVLMPruner
from mmprune.methods.fastv import FastVPruner
from mmprune.methods.feather import FeatherPruner
from mmprune.methods.flashvlm import FlashVLMPruner
from mmprune.methods.flowcut import FlowCutPruner
from mmprune.methods.fopru import FoPruPruner
from mmprune.methods.framefusion import FrameFusionPruner
from mmprune.methods.hiprune import HiPrunePruner
from mmprune.methods.hired import HiREDPruner
from mmprune.methods.holov import HoloVPruner
from mmprune.methods.idpruner import IDPrunerPruner
from mmprune.methods.mmtok import MMTokPruner
from mmprune.methods.none import NonePruner
from mmprune.methods.pitome import PiToMePruner
from mmprune.methods.pool import PoolPruner
from mmprune.methods.prumerge import PruMergePlusPruner, PruMergePruner
from mmprune.methods.pyramiddrop import PyramidDropPruner
from mmprune.methods.random import RandomPruner
from mmprune.methods.recoverable import RecoverablePruner
from mmprune.methods.scope import SCOPEPruner
from mmprune.methods.seats import SeatsPruner
from mmprune.methods.sms import SMSPruner
from mmprune.methods.sparsevlm import SparseVLMPruner
from mmprune.methods.todre import ToDREPruner
from mmprune.methods.tome import ToMePruner
from mmprune.methods.uniform import UniformPruner
from mmprune.methods.visiondrop import VisionDropPruner
from mmprune.methods.vispruner import VisPrunerPruner
from mmprune.methods.vtc_cls import VTCCLSPruner
from mmprune.methods.visionzip import VisionZipPruner
from mmprune.methods.zeroth_order import ZerothOrderPruner

__all__ = [
    "POSITION_POLICIES",
    "CDPrunerPruner",
    "ClusterPruner",
    "DARTPruner",
    "DivPrunePruner",
    "DyCokePruner",
    "EVSPruner",
    "FastVPruner",
    "FasterVLMPruner",
    "FeatherPruner",
    "FlashVLMPruner",
    "FlowCutPruner",
    "FoPruPruner",
    "FrameFusionPruner",
    "HiPrunePruner",
    "HiREDPruner",
    "HoloVPruner",
    "HybridPruner",
    "IDPrunerPruner",
    "InLLMPruner",
    "MMTokPruner",
    "MultiStagePruner",
    "NonePruner",
    "PiToMePruner",
    "PoolPruner",
    "PreLLMPruner",
    "PruMergePlusPruner",
    "PruMergePruner",
    "Pruner",
    "PyramidDropPruner",
    "RandomPruner",
    "RecoverablePruner",
    "SCOPEPruner",
    "SeatsPruner",
    "SMSPruner",
    "SingleStagePruner",
    "SparseVLMPruner",
    "ToDREPruner",
    "ToMePruner",
    "UniformPruner",
    "VideoPruner",
    "VTCCLSPruner",
    "VisionDropPruner",
    "VisPrunerPruner",
    "VisionZipPruner",
    "ZerothOrderPruner",
]
