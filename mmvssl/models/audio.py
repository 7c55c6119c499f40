"""Log-mel spectrogram audio encoders: a patch transformer (VATT's SpT / AST) and a 2-D ResNet (MMV).

Both take the raw waveform (B, S) of the batch and compute the log-mel spectrogram themselves
(torchaudio, 80 mel bins by default), so the data pipeline stays one waveform for every model.
"""

from __future__ import annotations

import contextlib

import torch
import torchvision
from torch import nn

from .encoders import TokenEncoder, _drop_tokens, _resize_positions
from .transformer import Transformer

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")


class LogMel(nn.Module):
    """(B, S) waveform -> (B, 1, n_mels, frames) log-mel spectrogram (window and filterbank are
    fixed buffers, not saved)."""

    def __init__(self, sample_rate: int = 16000, n_mels: int = 80, win_ms: float = 25.0, hop_ms: float = 10.0):
        super().__init__()
        win = int(round(sample_rate * win_ms / 1000))
        self.hop = int(round(sample_rate * hop_ms / 1000))
        self.n_mels = n_mels
        # Imported here, not at module level: a torchaudio whose extension does not load beside the
        # installed torch then breaks only the log-mel encoders, not every import of mmvssl.models.
        import torchaudio
        with torch.device("cpu"):  # the filterbank is computed with .item(), which meta tensors refuse
            self.mel = torchaudio.transforms.MelSpectrogram(
                sample_rate=sample_rate, n_fft=win, win_length=win, hop_length=self.hop, n_mels=n_mels, center=True)
        for name, buf in list(self.mel.named_buffers()):  # derived from the arguments: keep out of checkpoints
            owner = self.mel.get_submodule(name.rsplit(".", 1)[0]) if "." in name else self.mel
            owner.register_buffer(name.rsplit(".", 1)[-1], buf, persistent=False)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        if audio.ndim != 2:
            raise ValueError(f"log-mel audio encoder expects a waveform (B, S), got {tuple(audio.shape)}")
        no_autocast = (torch.autocast(audio.device.type, enabled=False) if audio.device.type in ("cpu", "cuda")
                       else contextlib.nullcontext())
        with no_autocast:  # the FFT in float32
            spec = self.mel(audio.float())  # (B, n_mels, frames)
        return torch.log(spec + 1e-6)[:, None]  # (B, 1, n_mels, frames)


class SpectrogramEncoder(TokenEncoder):
    """Log-mel patches (Conv2d, kernel = stride = mel_patch x time_patch) + factorised
    frequency/time positions + DropToken, then a transformer (AST / VATT SpT)."""

    def __init__(self, width: int, depth: int, heads: int, patch: tuple[int, int] = (16, 16),
                 sample_rate: int = 16000, n_mels: int = 80, num_samples: int = 32000, mlp_ratio: float = 4.0,
                 drop_token: float = 0.0, shared: Transformer | None = None):
        super().__init__()
        self.patch = tuple(patch)
        self.drop_token = drop_token
        self.logmel = LogMel(sample_rate, n_mels)
        frames = num_samples // self.logmel.hop + 1
        if n_mels % self.patch[0]:
            raise ValueError(f"n_mels {n_mels} is not divisible by the mel patch {self.patch[0]}")
        self.patch_embed = nn.Conv2d(1, width, kernel_size=self.patch, stride=self.patch)
        self.pos_f = nn.Parameter(torch.randn(1, n_mels // self.patch[0], width) * 0.02)
        self.pos_t = nn.Parameter(torch.randn(1, max(1, frames // self.patch[1]), width) * 0.02)
        self._init_backbone(width, depth, heads, mlp_ratio, shared)

    def forward(self, audio: torch.Tensor) -> dict[str, torch.Tensor]:
        spec = self.logmel(audio)  # (B, 1, M, F)
        if spec.shape[-1] < self.patch[1]:
            raise ValueError(f"audio of {audio.shape[1]} samples gives {spec.shape[-1]} spectrogram frames, "
                             f"fewer than the time patch {self.patch[1]}")
        x = self.patch_embed(spec.to(self.patch_embed.weight.dtype))  # (B, D, f, t)
        B, D, f, t = x.shape
        x = x.permute(0, 2, 3, 1)  # (B, f, t, D)
        if self.in_proj is not None:
            x = self.in_proj(x)
        pos = _resize_positions(self.pos_f, f)[:, :, None] + _resize_positions(self.pos_t, t)[:, None, :]
        x = (x + pos).reshape(B, f * t, D)  # (B, N, D)
        if self.training and self.drop_token > 0:
            x = _drop_tokens(x, self.drop_token)
        return self._transform(x)


class AudioResNet(nn.Module):
    """MMV's audio network: a torchvision 2-D ResNet (weights=None, one input channel) on the
    log-mel spectrogram. pooled = global average; tokens = the last feature map's cells."""

    def __init__(self, arch: str = "resnet50", sample_rate: int = 16000, n_mels: int = 80,
                 num_samples: int = 32000):
        super().__init__()
        self.num_samples = num_samples  # the clip length it is built for (inputs may differ)
        if arch not in RESNETS:
            raise ValueError(f"unknown audio ResNet '{arch}' (expected: {', '.join(RESNETS)})")
        net = getattr(torchvision.models, arch)(weights=None)
        net.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.logmel = LogMel(sample_rate, n_mels)
        self.stages = nn.Sequential(nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool),
                                    net.layer1, net.layer2, net.layer3, net.layer4)
        self.width = net.fc.in_features
        self.grad_checkpointing = False

    def forward(self, audio: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.logmel(audio).to(self.stages[0][0].weight.dtype)  # (B, 1, M, F)
        for stage in self.stages:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(stage, x, use_reentrant=False)
            else:
                x = stage(x)
        tokens = x.flatten(2).transpose(1, 2)  # (B, f * t, C)
        return {"pooled": tokens.mean(dim=1), "tokens": tokens}
