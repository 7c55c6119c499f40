"""Methods: one module each (see base.py for the unit the engine calls). `method.name` in a config
picks one; several papers' recipes share a module and differ only in their config
(`configs/methods/*.yaml`: SimCLR and CVRL are both `simclr`, VATT, MMV and iBoot are all
`contrastive`)."""

from __future__ import annotations

import importlib

from ..errors import ConfigError
from .base import BuildContext, Method

# name -> module; imported on use, so that listing methods stays cheap
MODULES = {
    "carl": "carl",
    "cmpl": "cmpl",
    "coclr": "coclr",
    "concur": "concur",
    "constcl": "constcl",
    "contrastive": "contrastive",
    "cstp": "cstp",
    "fame": "fame",
    "maclr": "maclr",
    "mcl": "mcl",
    "mscl": "mscl",
    "narrator": "narrator",
    "simclr": "simclr",
    "stcmix": "stcmix",
    "supervised": "supervised",
    "svt": "svt",
    "teg": "teg",
    "tg": "tg",
}


def get_method(name: str) -> type[Method]:
    if name not in MODULES:
        raise ConfigError(f"method.name '{name}' is unknown (available: {', '.join(MODULES)})")
    module = importlib.import_module(f"{__name__}.{MODULES[name]}")
    return next(obj for obj in vars(module).values()
                if isinstance(obj, type) and issubclass(obj, Method) and obj is not Method and obj.name == name)


def method_configs() -> dict[str, list[str]]:
    """method name -> the configs under configs/methods/ that train it (paths as in the repository)."""
    from ..config import load_config
    from ..resources import data_path
    found: dict[str, list[str]] = {}
    for path in sorted(data_path("configs", "methods").glob("*.yaml")):
        found.setdefault(load_config(path).method.name, []).append(f"configs/methods/{path.name}")
    return found


def build_method(cfg, ctx: BuildContext):
    """(student model, method) for `method.name`."""
    return get_method(cfg.method.name).build(cfg, ctx)


__all__ = ["BuildContext", "Method", "MODULES", "build_method", "get_method"]
