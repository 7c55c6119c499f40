"""Projection heads into the shared embedding spaces (`heads.type` in a preset).

- `fac` (MMV's fine-and-coarse, the default): video and audio meet in a fine space `va`; text
  meets video in a coarser space `vat` reached from the video's `va` embedding, so audio reaches
  `vat` through the same va->vat head at evaluation. Dimensions are 512 (va) and 256 (vat) in MMV.
- `shared`: one space `vat`; every modality projects into it with its own linear layer (motion
  streams too: `flow_vat`, `tgrad_vat`).
- `disjoint`: two independent spaces, `va` (video, audio) and `vt` (video, text), with
  separate video projections into each.

Every head has `project(modality, pooled, space)` for one embedding and `embed(pooled)` for all
the embeddings the objective may ask for, keyed `<modality>_<space>`; both are unnormalised.
"""

from __future__ import annotations

import torch
from torch import nn


class _Heads(nn.Module):
    spaces: dict[str, tuple[str, ...]] = {}  # modality -> the spaces it embeds in

    def _check(self, modality: str, space: str) -> None:
        if modality not in self.spaces:
            raise ValueError(f"unknown modality '{modality}' (expected: {', '.join(self.spaces)})")
        if space not in self.spaces[modality]:
            raise ValueError(f"{modality} embeds only in space(s) {', '.join(map(repr, self.spaces[modality]))}"
                             f" with {type(self).__name__}, not '{space}'")


class FACHeads(_Heads):
    spaces = {"video": ("va", "vat"), "audio": ("va", "vat"), "text": ("vat",)}

    def __init__(self, video_width: int, audio_width: int | None = None, text_width: int | None = None,
                 va_dim: int = 512, vat_dim: int = 256):
        super().__init__()
        self.video_to_va = nn.Sequential(  # Linear-BN-ReLU-Linear-BN
            nn.Linear(video_width, va_dim), nn.BatchNorm1d(va_dim), nn.ReLU(inplace=True),
            nn.Linear(va_dim, va_dim), nn.BatchNorm1d(va_dim))
        if audio_width is not None:
            self.audio_to_va = nn.Linear(audio_width, va_dim)
        self.va_to_vat = nn.Sequential(nn.ReLU(), nn.Linear(va_dim, vat_dim), nn.BatchNorm1d(vat_dim))
        if text_width is not None:
            self.text_to_vat = nn.Linear(text_width, vat_dim)

    def project(self, modality: str, pooled: torch.Tensor, space: str) -> torch.Tensor:
        """(N, width) encoder output -> (N, dim) embedding in `space` ('va' or 'vat'), unnormalised."""
        self._check(modality, space)
        if modality == "text":
            return self.text_to_vat(pooled)
        va = self.video_to_va(pooled) if modality == "video" else self.audio_to_va(pooled)
        return va if space == "va" else self.va_to_vat(va)

    def embed(self, pooled: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        if "video" in pooled:
            out["video_va"] = self.video_to_va(pooled["video"])
            out["video_vat"] = self.va_to_vat(out["video_va"])  # the video's va -> vat, computed once
        if "audio" in pooled:
            out["audio_va"] = self.audio_to_va(pooled["audio"])
        if "text" in pooled:
            out["text_vat"] = self.text_to_vat(pooled["text"])
        return out


class SharedHeads(_Heads):
    """A single space `vat` for all modalities, one linear projection each."""

    spaces = {"video": ("vat",), "audio": ("vat",), "text": ("vat",), "flow": ("vat",), "tgrad": ("vat",)}

    def __init__(self, video_width: int | None = None, audio_width: int | None = None,
                 text_width: int | None = None, dim: int = 512, flow_width: int | None = None,
                 tgrad_width: int | None = None):
        super().__init__()
        widths = {"video": video_width, "audio": audio_width, "text": text_width, "flow": flow_width,
                  "tgrad": tgrad_width}
        self.to_vat = nn.ModuleDict({m: nn.Linear(w, dim) for m, w in widths.items() if w is not None})

    def project(self, modality: str, pooled: torch.Tensor, space: str) -> torch.Tensor:
        self._check(modality, space)
        return self.to_vat[modality](pooled)

    def embed(self, pooled: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {f"{m}_vat": self.to_vat[m](x) for m, x in pooled.items()}


class DisjointHeads(_Heads):
    """Independent spaces `va` (video, audio) and `vt` (video, text); the video projects into both."""

    spaces = {"video": ("va", "vt"), "audio": ("va",), "text": ("vt",)}

    def __init__(self, video_width: int, audio_width: int | None = None, text_width: int | None = None,
                 va_dim: int = 512, vt_dim: int = 256):
        super().__init__()
        self.proj = nn.ModuleDict({"video_va": nn.Linear(video_width, va_dim),
                                   "video_vt": nn.Linear(video_width, vt_dim)})
        if audio_width is not None:
            self.proj["audio_va"] = nn.Linear(audio_width, va_dim)
        if text_width is not None:
            self.proj["text_vt"] = nn.Linear(text_width, vt_dim)

    def project(self, modality: str, pooled: torch.Tensor, space: str) -> torch.Tensor:
        self._check(modality, space)
        return self.proj[f"{modality}_{space}"](pooled)

    def embed(self, pooled: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: layer(pooled[name.split("_")[0]]) for name, layer in self.proj.items()
                if name.split("_")[0] in pooled}


class ProjectionHeads(_Heads):
    """Single-modality self-supervision (SimCLR, CVRL, SVT, ...): one space `ssl`, reached by an MLP
    projection head per modality present: Linear-BN-ReLU, `layers - 1` times, then Linear
    (SimCLR's g: 2 layers; CVRL's: 4). The methods read `video_ssl` (B, V, D) per view; a motion
    stream has its own head: `flow_ssl`, `tgrad_ssl`."""

    spaces = {"video": ("ssl",), "audio": ("ssl",), "text": ("ssl",), "flow": ("ssl",), "tgrad": ("ssl",)}

    def __init__(self, video_width: int | None = None, audio_width: int | None = None,
                 text_width: int | None = None, dim: int = 128, hidden: int = 2048, layers: int = 2,
                 flow_width: int | None = None, tgrad_width: int | None = None):
        super().__init__()
        if layers < 1:
            raise ValueError(f"projection heads need layers >= 1, got {layers}")
        widths = {"video": video_width, "audio": audio_width, "text": text_width, "flow": flow_width,
                  "tgrad": tgrad_width}
        self.mlp = nn.ModuleDict()
        for modality, width in widths.items():
            if width is None:
                continue
            blocks, d = [], width
            for _ in range(layers - 1):
                blocks += [nn.Linear(d, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
                d = hidden
            self.mlp[modality] = nn.Sequential(*blocks, nn.Linear(d, dim))

    def project(self, modality: str, pooled: torch.Tensor, space: str) -> torch.Tensor:
        self._check(modality, space)
        return self.mlp[modality](pooled)

    def embed(self, pooled: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {f"{m}_ssl": self.mlp[m](x) for m, x in pooled.items() if m in self.mlp}


HEADS = {"fac": FACHeads, "shared": SharedHeads, "disjoint": DisjointHeads, "projection": ProjectionHeads}
