"""Where the data folders (models/, configs/, eval/tasks/) live: beside the package in a
checkout, inside it (mmvssl/_data/) in an installed wheel."""

from __future__ import annotations

from pathlib import Path

import yaml

from .errors import ConfigError

_PACKAGE = Path(__file__).resolve().parent


def data_path(*parts: str) -> Path:
    """Path of a shipped data file or folder, e.g. data_path('models', 'vatt-tiny.yaml')."""
    for root in (_PACKAGE / "_data", _PACKAGE.parent):
        candidate = root.joinpath(*parts)
        if candidate.exists():
            return candidate
    return _PACKAGE.parent.joinpath(*parts)


def read_yaml_mapping(path: Path, what: str) -> dict:
    """A YAML file whose top level is a mapping (a preset, a task); errors name the file."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: {what} must be a mapping")
    return data
