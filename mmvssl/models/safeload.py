"""Loading a model folder someone handed us: its config.json decides how large the model is
(`text.vocab_size: 1e10` asks for terabytes), so the model is first built on the meta device
(no memory) and every tensor's name and shape compared with the safetensors header of
model.safetensors (read without reading the weights); only a config that matches the weights
on disk is then built for real, so memory never exceeds what the weights file itself holds.
Used by MultimodalModel.from_pretrained (load_model) and Narrator.from_pretrained.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from ..errors import ConfigError


def header_shapes(weights: Path) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} from a safetensors file's header; ConfigError when it is unreadable."""
    from safetensors import safe_open
    try:
        with safe_open(str(weights), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for damaged headers
        raise ConfigError(f"{weights}: unreadable weights ({str(e).splitlines()[0][:200]})") from None


def check_config_fits_weights(build: Callable[[], torch.nn.Module], cfg_file: Path, weights: Path,
                              optional: tuple[str, ...] = ()) -> None:
    """Build the model on the meta device and compare its state dict with the weights' header:
    a missing, unexpected or differently shaped tensor is a ConfigError naming the tensor, its
    shape in the file and the shape the config asks for. `optional`: names the file may lack
    (tied weights saved once)."""
    shapes = header_shapes(weights)
    try:
        with torch.device("meta"):
            model = build()
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - any builder error means the config is not a model of ours
        raise ConfigError(f"{cfg_file}: does not describe a model ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for name, shape in expected.items():
        if name not in shapes:
            if name in optional:
                continue
            raise ConfigError(f"{weights}: has no tensor '{name}' that {cfg_file.name} asks for (shape {list(shape)})")
        if shapes[name] != shape:
            raise ConfigError(f"{weights}: tensor '{name}' is {list(shapes[name])}, {cfg_file.name} asks for "
                              f"{list(shape)}")
    unexpected = sorted(set(shapes) - set(expected))
    if unexpected:
        raise ConfigError(f"{weights}: does not match {cfg_file.name} (unexpected tensors {unexpected[:3]})")
