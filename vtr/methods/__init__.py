"""The registered pruning methods. Adding one: a file here with a registered ``Method`` dataclass, one import line
below, and a CHANGELOG line; the test matrices and the docs pick it up from the registry."""
from .base import Merge, Method, Stage, StageSpec
from .cdpruner import CDPruner
from .dart import DART
from .divprune import DivPrune
from .dycoke import DyCoke
from .fastervlm import FasterVLM
from .fastv import FastV
from .fastvid import FastVID
from .flowcut import FlowCut
from .framefusion import FrameFusion
from .hiprune import HiPrune
from .holitom import HoliTom
from .pdrop import PyramidDrop
from .prunevid import PruneVid
from .sparsevlm import SparseVLM
from .random import Random
from .registry import REGISTRY, lookup, register
from .uniform import Uniform
from .vflowopt import VFlowOpt
from .vispruner import VisPruner
from .visionzip import VisionZip

__all__ = ["CDPruner", "DART", "DivPrune", "DyCoke", "FastV", "FastVID", "FasterVLM", "FlowCut", "FrameFusion",
           "HiPrune", "HoliTom", "Merge", "Method", "PruneVid", "PyramidDrop", "REGISTRY", "Random", "SparseVLM",
           "Stage", "StageSpec", "Uniform", "VFlowOpt", "VisPruner", "VisionZip", "lookup",
           "register"]
