"""The registered pruning methods. Adding one: a file here with a registered ``Method`` dataclass, one import line
below, and a CHANGELOG line; the test matrices and the docs pick it up from the registry."""
from .base import Merge, Method, Stage, StageSpec, VisionMerge
from .cdpruner import CDPruner
from .dart import DART
from .divprune import DivPrune
from .dycoke import DyCoke
from .evs import EVS
from .fastervlm import FasterVLM
from .fastv import FastV
from .fastvid import FastVID
from .flowcut import FlowCut
from .framefusion import FrameFusion
from .hiprune import HiPrune
from .holitom import HoliTom
from .mustdrop import MustDrop
from .pdrop import PyramidDrop
from .prumerge import PruMerge
from .prunevid import PruneVid
from .sparsevlm import SparseVLM
from .tome import ToMe
from .random import Random
from .registry import REGISTRY, lookup, register
from .uniform import Uniform
from .vidcom2 import VidCom2
from .vflowopt import VFlowOpt
from .vispruner import VisPruner
from .visionzip import VisionZip

__all__ = ["CDPruner", "DART", "DivPrune", "DyCoke", "EVS", "FastV", "FastVID", "FasterVLM", "FlowCut",
           "FrameFusion", "HiPrune", "HoliTom", "Merge", "Method", "MustDrop", "PruMerge", "PruneVid", "PyramidDrop",
           "REGISTRY", "Random", "SparseVLM", "Stage", "StageSpec", "ToMe", "Uniform", "VFlowOpt", "VidCom2",
           "VisPruner", "VisionMerge", "VisionZip", "lookup", "register"]
