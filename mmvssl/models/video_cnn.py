"""torchvision video backbones (3-D CNNs and video transformers) behind the encoder interface.

`TorchvisionVideoEncoder(arch)` builds torchvision's network with weights=None (nothing is
downloaded), drops its classifier, and returns {"pooled": (B, C), "tokens": (B, N, C)} with
`.width` = C, like the VATT encoders.

Deflation (`forward_image`): a 3-D CNN runs on still images with every temporal filter summed
over its taps (and temporal pooling, stride and padding removed): the output for an image equals
the output for the static clip that repeats it, wherever temporal padding does not reach the
clip's ends (exactly so when convolutions pad by replicating frames). The video transformers
(mvit_v2_s, swin3d_t) run the static clip itself.

Motion inputs: `in_channels` (default 3) replaces the network's first convolution by one with that
many input channels and the same geometry, initialised as torchvision initialises it (2 for
optical flow, 3 for frame differences or RGB).
"""

from __future__ import annotations

import copy

import torch
import torchvision
from torch import nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

CNNS = ("r3d_18", "r2plus1d_18", "mc3_18", "s3d")
TRANSFORMERS = ("mvit_v2_s", "swin3d_t")
ARCHS = CNNS + TRANSFORMERS


def _spatial(v) -> tuple:
    """The (h, w) part of a pool's int-or-triple kernel / stride / padding."""
    return ((v,) * 3 if isinstance(v, int) else tuple(v))[1:]


def _set_input_channels(net: nn.Module, in_channels: int, arch: str) -> None:
    """Replace the first Conv3d of `net` (its RGB input layer) by one taking `in_channels`."""
    for parent in net.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Conv3d):
                conv = nn.Conv3d(in_channels, child.out_channels, child.kernel_size, stride=child.stride,
                                 padding=child.padding, dilation=child.dilation, groups=child.groups,
                                 bias=child.bias is not None, padding_mode=child.padding_mode)
                if arch in ("r3d_18", "r2plus1d_18", "mc3_18"):  # torchvision's VideoResNet init
                    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
                    if conv.bias is not None:
                        nn.init.zeros_(conv.bias)
                setattr(parent, name, conv)  # s3d, mvit, swin keep nn.Conv3d's default init, as theirs
                return
    raise ValueError(f"{arch} has no Conv3d input layer")


def _deflate_modules(net: nn.Module) -> nn.Module:
    """A copy of `net` in which every Conv3d / pool has temporal kernel, stride and padding 1, 1, 0.
    Its parameters keep their names; the conv weights are fed in summed (see forward_image)."""
    net = copy.deepcopy(net)
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Conv3d):
                flat = nn.Conv3d(child.in_channels, child.out_channels, (1, *child.kernel_size[1:]),
                                 stride=(1, *child.stride[1:]), padding=(0, *child.padding[1:]),
                                 dilation=(1, *child.dilation[1:]), groups=child.groups,
                                 bias=child.bias is not None, padding_mode=child.padding_mode, device="meta")
                setattr(parent, name, flat)
            elif isinstance(child, (nn.MaxPool3d, nn.AvgPool3d)):
                child.kernel_size = (1, *_spatial(child.kernel_size))
                child.stride = (1, *_spatial(child.stride))
                child.padding = (0, *_spatial(child.padding))
    return net


class TorchvisionVideoEncoder(nn.Module):
    """One of torchvision's video networks (r3d_18, r2plus1d_18, mc3_18, s3d, mvit_v2_s,
    swin3d_t) as an encoder. mvit_v2_s has fixed-size positions: 16 x 224 x 224 clips only.
    `in_channels`: 3 for RGB or frame differences, 2 for optical flow."""

    def __init__(self, arch: str = "r2plus1d_18", num_frames: int = 16, image_size: int = 112,
                 in_channels: int = 3):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown torchvision video backbone '{arch}' (expected: {', '.join(ARCHS)})")
        if not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive integer, got {in_channels!r}")
        self.arch, self.num_frames, self.image_size, self.in_channels = arch, num_frames, image_size, in_channels
        net = getattr(torchvision.models.video, arch)(weights=None)
        if in_channels != 3:
            _set_input_channels(net, in_channels, arch)
        if arch in ("r3d_18", "r2plus1d_18", "mc3_18"):
            self.stages = nn.ModuleList([net.stem, net.layer1, net.layer2, net.layer3, net.layer4])
            self.width = net.fc.in_features
        elif arch == "s3d":
            self.stages = nn.ModuleList(list(net.features))
            self.width = net.classifier[1].in_channels
        elif arch == "swin3d_t":
            self.stages = nn.ModuleList([net.patch_embed, *net.features])
            self.norm = net.norm
            self.width = net.head.in_features
        else:  # mvit_v2_s
            self.conv_proj, self.pos_encoding, self.stages, self.norm = (
                net.conv_proj, net.pos_encoding, net.blocks, net.norm)
            self.width = net.head[1].in_features
        self.grad_checkpointing = False
        self._deflated: list[nn.Module] = []  # built on first use, never registered or saved

    def _run(self, stage: nn.Module, *args):
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(stage, *args, use_reentrant=False)
        return stage(*args)

    def _check(self, video: torch.Tensor) -> None:
        C = self.in_channels
        if video.ndim != 5 or video.shape[1] != C:
            raise ValueError(f"{self.arch} video encoder expects (B, {C}, T, H, W), got {tuple(video.shape)}")
        if self.arch == "mvit_v2_s" and tuple(video.shape[2:]) != (16, 224, 224):
            raise ValueError(f"mvit_v2_s expects clips of (B, {C}, 16, 224, 224), got {tuple(video.shape)}")

    def _forward_cnn(self, stages, video: torch.Tensor) -> dict[str, torch.Tensor]:
        x = video
        for stage in stages:
            x = self._run(stage, x)  # (B, C, t, h, w) after the last stage
        tokens = x.flatten(2).transpose(1, 2)  # (B, t * h * w, C)
        return {"pooled": tokens.mean(dim=1), "tokens": tokens}

    def forward(self, video: torch.Tensor) -> dict[str, torch.Tensor]:
        self._check(video)
        if self.arch in CNNS:
            return self._forward_cnn(self.stages, video)
        if self.arch == "swin3d_t":
            x = video
            for stage in self.stages:
                x = self._run(stage, x)  # (B, t, h, w, C)
            tokens = self.norm(x).flatten(1, 3)  # (B, t * h * w, C)
            return {"pooled": tokens.mean(dim=1), "tokens": tokens}
        x = self.conv_proj(video).flatten(2).transpose(1, 2)  # (B, N, C)
        x = self.pos_encoding(x)  # prepends the class token: (B, 1 + N, C)
        thw = (self.pos_encoding.temporal_size,) + self.pos_encoding.spatial_size
        for block in self.stages:
            x, thw = self._run(block, x, thw)
        x = self.norm(x)
        return {"pooled": x[:, 0], "tokens": x[:, 1:]}

    def forward_image(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, C, H, W) stills -> the encoder output of their static clips (see the module docstring)."""
        if images.ndim != 4 or images.shape[1] != self.in_channels:
            raise ValueError(f"{self.arch} image encoder expects (B, {self.in_channels}, H, W), "
                             f"got {tuple(images.shape)}")
        if self.arch not in CNNS:
            return self(images[:, :, None].expand(-1, -1, self.num_frames, -1, -1))  # (B, C, T, H, W)
        if not self._deflated:
            self._deflated.append(_deflate_modules(self.stages))
        deflated = self._deflated[0]
        deflated.train(self.training)
        state = dict(self.stages.named_parameters())
        state.update(self.stages.named_buffers())
        for name, m in self.stages.named_modules():
            if isinstance(m, nn.Conv3d):
                state[f"{name}.weight"] = m.weight.sum(dim=2, keepdim=True)  # (O, I, 1, kh, kw)
        x = images[:, :, None]  # (B, C, 1, H, W)
        for i in range(len(deflated)):
            prefix = f"{i}."
            sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            x = functional_call(deflated[i], sub, (x,))
        tokens = x.flatten(2).transpose(1, 2)  # (B, h * w, C)
        return {"pooled": tokens.mean(dim=1), "tokens": tokens}
