"""`model.init_from: FOLDER`: a pretraining (or any `build_student`) run starts from a model folder.

- A trained mmvssl folder (a pretraining run's `model/`, a fine-tuned folder): the run's preset is
  built as usual and the folder's weights loaded into it, when the architectures match (every
  weight of the one is in the other, with the same shape); otherwise one line names the first
  weight that differs. The run's config decides the architecture; the folder only the values.
- An imported folder (`mmvssl models import`): its towers are the source's own modules, which no
  mmvssl preset holds (docs/models.md), so the run's model is the imported model itself and
  `model.preset` is not used; `model.overrides` and `model.init_arch` (which change a preset) are
  refused. Its spaces are the source's (`vat` for video + text, `ssl` for a video-only model), so
  the objective's terms name those embeddings (`video_vat`, `text_vat`), and the loader tokenizes
  with the source's tokenizer (mmvssl.data.text.tokenizer_for). A video model whose clip length is
  fixed by its position table refuses another `data.num_frames`.
- A combined folder joins separately trained spaces: refused (start from one of its parts).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ...errors import ConfigError


def init_from_folder(net: nn.Module, folder: str, sampling: dict, overrides: dict | None = None,
                     init_arch: str = "") -> nn.Module:
    """The run's model started from `folder` (module docstring); `net` is the model the preset built."""
    from .build import is_imported, load_imported, read_folder_config
    from .combined import is_combined
    where = f"model.init_from: {folder}"
    config = read_folder_config(folder) if Path(folder).is_dir() else None
    if not isinstance(config, dict):
        raise ConfigError(f"{where} is not a model folder (no readable config.json)")
    if is_combined(config):
        raise ConfigError(f"{where} joins separately trained parts; start from one of them ({folder}/parts/NAME)")
    if is_imported(config):
        if overrides or init_arch:
            raise ConfigError(f"{where} is an imported {config['source'].get('model_type') or 'open_clip'} model, whose "
                              f"architecture is its source's: leave model.overrides and model.init_arch empty")
        model = load_imported(folder, config)
        own = model.config.get("sampling", {})
        fixed = model.config["source"].get("pooling") != "frames" and "video" in model.encoders
        if fixed and int(sampling["num_frames"]) != int(own["num_frames"]):
            raise ConfigError(f"{where} takes clips of {own['num_frames']} frames (its position table), not "
                              f"data.num_frames={sampling['num_frames']}")
        model.config["sampling"] = {**own, **{k: v for k, v in sampling.items()
                                              if k != "audio_rate" or "audio" in model.encoders}}
        return model.train()
    from ..multimodal import MultimodalModel
    source = MultimodalModel.from_pretrained(folder)
    ours, theirs = net.state_dict(), source.state_dict()
    name = net.config.get("name", "the preset")
    for key, value in ours.items():
        if key not in theirs:
            raise ConfigError(f"{where} does not match model.preset '{name}': it has no weight {key} "
                              f"({tuple(value.shape)} here; it is a '{source.name}' model)")
        if theirs[key].shape != value.shape:
            raise ConfigError(f"{where} does not match model.preset '{name}': {key} is {tuple(theirs[key].shape)} "
                              f"there, {tuple(value.shape)} here")
    extra = [k for k in theirs if k not in ours]
    if extra:
        raise ConfigError(f"{where} does not match model.preset '{name}': it has {extra[0]}, which the preset lacks "
                          f"({len(extra)} weight(s) in all; it is a '{source.name}' model)")
    net.load_state_dict(theirs)
    return net
