"""Res2Net-50 v1b (26w×4s) encoder, as used by PraNet-V1/V2, with configurable widths and depths.

Res2Net: Gao et al., "Res2Net: A New Multi-scale Backbone Architecture", TPAMI 2021. The "v1b"
variant (the one PraNet loads) adds the ResNet-D tricks: a deep 3-conv stem instead of the 7×7 conv,
and an average-pool before the 1×1 projection shortcut ("avg-down").

Layout (defaults = Res2Net-50 v1b 26w4s, 23,669,352 parameters without the ImageNet fc):

* stem: 3×3 s2 (C_in→s) → BN → ReLU → 3×3 (s→s) → BN → ReLU → 3×3 (s→p₁) → BN → ReLU →
  MaxPool(3, 2, 1), with s = ``stem_width`` (32) and p₁ = ``stage_planes[0]`` (64).
* four stages of Bottle2neck blocks (``layers`` = 3, 4, 6, 3; ``stage_planes`` = 64, 128, 256, 512;
  expansion 4; strides 1, 2, 2, 2). Output strides 4, 8, 16, 32.

No classifier head is built (PraNet never uses it), and no ImageNet weights are loaded: they cannot
be downloaded here, so the encoder trains from scratch.
"""
from __future__ import annotations

import math

import torch
from torch import nn


class Bottle2neck(nn.Module):
    """Res2Net bottleneck: 1×1 → hierarchical 3×3 convs over ``scale`` splits → 1×1, plus shortcut.

    (B, C_in, H, W) → (B, 4·planes, H/stride, W/stride).

    The 1×1 conv yields ``scale`` splits of ``width = ⌊planes·base_width/64⌋`` channels. Split i > 0
    (in a "normal" block) is added to the output of split i − 1 before its own 3×3 conv, which grows
    the receptive field within the block; the last split passes through unchanged. The first block of
    a stage ("stage" block) convolves every split independently with the stage stride and
    average-pools the last split so that all splits share the new resolution.
    """

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1, first_in_stage: bool = False,
                 base_width: int = 26, scale: int = 4):
        super().__init__()
        width = int(math.floor(planes * (base_width / 64.0)))
        out_channels = planes * self.expansion
        self.width, self.scale, self.first_in_stage = width, scale, first_in_stage
        self.conv1 = nn.Conv2d(in_channels, width * scale, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width * scale)
        n_convs = max(scale - 1, 1)
        self.convs = nn.ModuleList(
            nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False) for _ in range(n_convs))
        self.bns = nn.ModuleList(nn.BatchNorm2d(width) for _ in range(n_convs))
        self.pool = nn.AvgPool2d(3, stride=stride, padding=1) if first_in_stage else None
        self.conv3 = nn.Conv2d(width * scale, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = None
        if stride != 1 or in_channels != out_channels:
            # ResNet-D "avg-down": pool first so the 1×1 projection sees every input pixel.
            pool = (nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False)
                    if stride > 1 else nn.Identity())
            self.shortcut = nn.Sequential(
                pool, nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        splits = torch.split(self.relu(self.bn1(self.conv1(x))), self.width, dim=1)
        outs = []
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
            sp = splits[i] if (i == 0 or self.first_in_stage) else outs[-1] + splits[i]
            outs.append(self.relu(bn(conv(sp))))
        if self.scale > 1:
            last = splits[len(self.convs)]
            outs.append(self.pool(last) if self.first_in_stage else last)
        out = self.bn3(self.conv3(torch.cat(outs, dim=1)))
        residual = x if self.shortcut is None else self.shortcut(x)
        return self.relu(out + residual)


class Res2NetEncoder(nn.Module):
    """Res2Net v1b feature extractor returning the four stage outputs.

    Args:
        in_channels: image channels (the first stem conv takes them directly; 1 for grey).
        stem_width: channels of the first two stem convs (32 in Res2Net-50 v1b).
        stage_planes: bottleneck "planes" of the four stages (outputs are 4× these).
        layers: blocks per stage ([3, 4, 6, 3] for Res2Net-50).
        base_width: the "26w" (split width = ⌊planes·base_width/64⌋).
        scale: the "4s" (number of splits).

    Call: (B, C_in, H, W) float32 → [F1, F2, F3, F4] with F_i of shape
    (B, 4·stage_planes[i−1], H/2^(i+1), W/2^(i+1)).
    """

    def __init__(self, in_channels: int = 3, stem_width: int = 32,
                 stage_planes: tuple[int, ...] = (64, 128, 256, 512),
                 layers: tuple[int, ...] = (3, 4, 6, 3), base_width: int = 26, scale: int = 4):
        super().__init__()
        if len(stage_planes) != 4 or len(layers) != 4:
            raise ValueError("Res2NetEncoder needs exactly four stage_planes and four layers")
        stem_out = stage_planes[0]
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, stem_width, 3, 2, 1, bias=False),
            nn.BatchNorm2d(stem_width), nn.ReLU(inplace=True),
            nn.Conv2d(stem_width, stem_width, 3, 1, 1, bias=False),
            nn.BatchNorm2d(stem_width), nn.ReLU(inplace=True),
            nn.Conv2d(stem_width, stem_out, 3, 1, 1, bias=False),
            nn.BatchNorm2d(stem_out), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        )
        channels = stem_out
        stages = []
        for i, (planes, blocks) in enumerate(zip(stage_planes, layers)):
            stride = 1 if i == 0 else 2
            stage = [Bottle2neck(channels, planes, stride, True, base_width, scale)]
            channels = planes * Bottle2neck.expansion
            stage += [Bottle2neck(channels, planes, 1, False, base_width, scale)
                      for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*stage))
        self.stages = nn.ModuleList(stages)
        self.out_channels = tuple(p * Bottle2neck.expansion for p in stage_planes)
        self._init_weights()

    def _init_weights(self) -> None:
        """He init (fan-out) for convs, BN at identity, as in the Res2Net reference code."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features
