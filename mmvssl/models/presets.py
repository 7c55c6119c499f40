"""Presets are data: one YAML per architecture in models/. Builders turn them into modules."""

from __future__ import annotations

import copy
import os
from pathlib import Path


from ..errors import ConfigError
from ..resources import data_path, read_yaml_mapping
from .multimodal import MultimodalModel


def list_presets() -> list[str]:
    return sorted(p.stem for p in data_path("models").glob("*.yaml"))


def load_preset(name_or_path: str | os.PathLike) -> dict:
    """A preset name (models/<name>.yaml) or a path to a YAML file -> the preset dict."""
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        path = data_path("models", f"{name_or_path}.yaml")
        if not path.is_file():
            raise ConfigError(f"unknown model preset '{name_or_path}' (available: {', '.join(list_presets())})")
    preset = read_yaml_mapping(path, "a preset")
    preset.setdefault("name", path.stem)
    return preset


def apply_overrides(preset: dict, overrides: dict) -> dict:
    """Dotted overrides ({'video.depth': 4} or nested dicts) onto a copy of the preset. A mapping under
    a section the preset lacks adds that section whole ({'flow': {'type': 'torchvision', ...}}: a
    motion stream beside the preset's video)."""
    out = copy.deepcopy(preset)
    overrides = dict(overrides or {})
    for key in [k for k, v in overrides.items() if isinstance(v, dict) and k not in out]:
        out[key] = copy.deepcopy(dict(overrides.pop(key)))

    def put(d: dict, dotted: str, value):
        *parents, leaf = dotted.split(".")
        for p in parents:
            if not isinstance(d.get(p), dict):
                raise ConfigError(f"model override '{dotted}': preset '{preset.get('name')}' has no section '{p}'")
            d = d[p]
        d[leaf] = value

    def walk(prefix: str, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            put(out, prefix, value)

    walk("", overrides)
    return out


def create_model(name_or_yaml: str | os.PathLike = "vatt-tiny", **overrides) -> MultimodalModel:
    """Build a preset (a name in models/ or a YAML path), optionally with dotted overrides."""
    return MultimodalModel(apply_overrides(load_preset(name_or_yaml), overrides))


def load_model(folder: str | os.PathLike, map_location: str = "cpu") -> MultimodalModel:
    """Load a folder written by `save_pretrained` (config.json + model.safetensors)."""
    from .imported import is_imported, load_imported, read_folder_config  # an imported model (docs/models.md)
    from .imported.combined import is_combined, load_combined  # parts joined (models import BASE --audio SRC)
    config = read_folder_config(folder)
    if is_imported(config):
        return load_imported(folder, config, map_location)
    if is_combined(config):
        return load_combined(folder, config, map_location)
    return MultimodalModel.from_pretrained(folder, map_location=map_location)
