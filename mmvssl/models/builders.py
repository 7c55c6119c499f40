"""Preset sections -> modules: the encoder registry, keyword checks that name the wrong key,
and the modality-agnostic shared backbone.

A modality section picks its encoder with `type` (default: the VATT transformer of that
modality); every other key is a keyword argument of that encoder's class. The motion sections
(`flow`, `tgrad`: modalities.MOTION_CHANNELS) take the video encoders, with `in_channels` 2 / 3 unless set. A top-level
`backbone: {width, depth, heads}` section makes the model modality-agnostic (VATT-MA): one
Transformer serves every transformer encoder, which then sets no width/depth/heads itself.
"""

from __future__ import annotations

import inspect

from torch import nn

from ..errors import ConfigError
from ..modalities import MOTION_CHANNELS
from .audio import AudioResNet, SpectrogramEncoder
from .encoders import AudioEncoder, TextEncoder, VideoEncoder
from .text_pool import WordPoolTextEncoder
from .transformer import Transformer
from .video_cnn import TorchvisionVideoEncoder

ENCODERS: dict[str, dict[str, type[nn.Module]]] = {
    "video": {"transformer": VideoEncoder, "torchvision": TorchvisionVideoEncoder},
    "audio": {"waveform": AudioEncoder, "spectrogram": SpectrogramEncoder, "resnet": AudioResNet},
    "text": {"transformer": TextEncoder, "word_pool": WordPoolTextEncoder},
}
DEFAULT_TYPE = {"video": "transformer", "audio": "waveform", "text": "transformer"}
BACKBONE_KEYS = ("width", "depth", "heads", "mlp_ratio")
INTERNAL = ("self", "shared")  # constructor arguments that presets never set


def build(cls, kwargs: dict, where: str, **internal):
    """Instantiate `cls(**kwargs, **internal)`, naming a misspelt or missing key instead of a bare TypeError."""
    params = inspect.signature(cls.__init__).parameters
    for key in kwargs:
        if key not in params or key in INTERNAL:
            allowed = ", ".join(p for p in params if p not in INTERNAL)
            raise ConfigError(f"unknown key '{where}.{key}' (expected one of: {allowed})")
    missing = [p.name for p in params.values()
               if p.default is inspect.Parameter.empty and p.name not in INTERNAL and p.name not in kwargs
               and p.kind is p.POSITIONAL_OR_KEYWORD]
    if missing:
        raise ConfigError(f"missing key '{where}.{missing[0]}'")
    try:
        return cls(**kwargs, **internal)
    except ValueError as e:  # an encoder rejecting a value: say which section it came from
        raise ConfigError(f"{where}: {e}") from None


def build_backbone(config: dict, name: str) -> Transformer | None:
    """The shared Transformer of a modality-agnostic preset (its `backbone` section), else None."""
    if "backbone" not in config:
        return None
    section = dict(config["backbone"])
    for key in section:
        if key not in BACKBONE_KEYS:
            raise ConfigError(f"unknown key '{name}.backbone.{key}' (expected one of: {', '.join(BACKBONE_KEYS)})")
    return build(Transformer, section, f"{name}.backbone")


def build_encoders(config: dict, name: str, backbone: Transformer | None) -> nn.ModuleDict:
    """One encoder per modality section present in the preset."""
    encoders = {}
    for modality in (*ENCODERS, *MOTION_CHANNELS):
        if modality not in config:
            continue
        if not isinstance(config[modality], dict):
            raise ConfigError(f"preset '{name}': section '{modality}' must be a mapping")
        family = "video" if modality in MOTION_CHANNELS else modality
        types, section = ENCODERS[family], dict(config[modality])
        if modality in MOTION_CHANNELS:
            section.setdefault("in_channels", MOTION_CHANNELS[modality])
        kind = section.pop("type", DEFAULT_TYPE[family])
        if kind not in types:
            raise ConfigError(f"preset '{name}': unknown {modality}.type '{kind}' (expected: {', '.join(types)})")
        cls, where = types[kind], f"{name}.{modality}"
        internal = {}
        if backbone is not None and "shared" in inspect.signature(cls.__init__).parameters:
            for key in BACKBONE_KEYS:
                if key in section:
                    raise ConfigError(f"key '{where}.{key}' is set by '{name}.backbone' in a modality-agnostic "
                                      f"preset; remove it")
            section.update(width=backbone.width, depth=0, heads=backbone.blocks[0].attn.heads
                           if len(backbone.blocks) else 1)
            internal["shared"] = backbone
        encoders[modality] = build(cls, section, where, **internal)
    return nn.ModuleDict(encoders)
