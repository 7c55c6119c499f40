"""mmvssl: multimodal self-supervised learning from video."""

from .models import MultimodalModel, create_model, list_presets, load_model

__version__ = "0.1.0"
__all__ = ["MultimodalModel", "create_model", "list_presets", "load_model", "__version__"]
