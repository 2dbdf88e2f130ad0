"""What a method sees when it selects: the candidate tokens of each image and lazily computed signals, one module
per source over a shared core (``core``): decoder attention rows and keys (``decoder``), the vision tower
(``vision``), video frames (``video``), the prompt's text (``text``); the vision stage's per-layer signals
(``vision_stage``). Each signal is computed once per stage, in one place."""
from .core import ContextBase, SpanCandidates
from .decoder import DecoderSignals
from .text import TextSignals
from .video import VideoSignals
from .vision import TowerSignals
from .vision_stage import VisionImage, VisionStageContext

__all__ = ["SelectionContext", "SpanCandidates", "VisionImage", "VisionStageContext"]


class SelectionContext(DecoderSignals, TowerSignals, VideoSignals, TextSignals, ContextBase):
    """One stage's view of the batch: every signal source a method may read (see the modules of ``vtr.signals``)."""
