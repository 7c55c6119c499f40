"""Encoders, heads, the multimodal model and its presets."""

from .accounting import build_on_meta, count_parameters, flops_per_clip
from .multimodal import MultimodalModel
from .presets import create_model, list_presets, load_model, load_preset

__all__ = ["MultimodalModel", "build_on_meta", "count_parameters", "create_model", "flops_per_clip",
           "list_presets", "load_model", "load_preset"]
