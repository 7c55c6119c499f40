"""Where the data folders (models/, configs/, eval/tasks/) live: beside the package in a
checkout, inside it (mmvssl/_data/) in an installed wheel."""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def data_path(*parts: str) -> Path:
    """Path of a shipped data file or folder, e.g. data_path('models', 'vatt-tiny.yaml')."""
    for root in (_PACKAGE / "_data", _PACKAGE.parent):
        candidate = root.joinpath(*parts)
        if candidate.exists():
            return candidate
    return _PACKAGE.parent.joinpath(*parts)
