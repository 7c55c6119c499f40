"""Encoders, heads, the multimodal model and its presets."""

from .multimodal import MultimodalModel
from .presets import create_model, list_presets, load_model, load_preset

__all__ = ["MultimodalModel", "create_model", "list_presets", "load_model", "load_preset"]
