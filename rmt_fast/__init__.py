"""rmt_fast: Recurrent Memory Transformer inference over very long inputs, fast and in fixed memory."""
from .config import RMTConfig
from .inputs import InvalidDocumentsError
from .model import RMTForSequenceClassification, RMTOutput
from .engine import Engine
from .memory_state import MemoryState, MemoryStateError
from .engine.sources import DocumentError, SourcesError

__version__ = "0.1.0"
__all__ = ["DocumentError", "SourcesError", "Engine", "RMTConfig", "RMTForSequenceClassification", "RMTOutput", "InvalidDocumentsError", "MemoryState", "MemoryStateError", "__version__"]
