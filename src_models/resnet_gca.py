"""ResNet-50 encoder with Grouped Coordinate Attention (GCA) in every bottleneck (GCA-ResUNet).

Ding & Gao, "GCA-ResUNet: Medical Image Segmentation Using Grouped Coordinate Attention"
(arXiv 2511.14087 / 2512.23990), §3.2–3.3, Eqs. 2–7. The encoder is the torchvision-v1.5 ResNet
(stride on the 3×3 conv) as used by bubbliiiing/unet-pytorch, whose parameter count the paper's
baseline matches exactly; avgpool and fc are removed and five features are returned.

GCA (default reading, MODELS.md §5.4), X (B, C, H, W), G groups of C_g = C/G channels, m = C_g/r::

    strips = [pool_W(X) ; pool_H(X)]           (B, C, H+W)   pool = mean + max ("fused" by addition)
    A      = σ(Conv1×1(ReLU(BN(Conv1×1(strips)))))   per group, C_g → m → C_g, shared weights
    Y      = X ⊙ A^h ⊙ A^w                     A split into (H) and (W) parts, broadcast

Sharing the two 1×1 convs across groups is implemented by folding the groups into the batch axis;
in training mode the BN between them therefore pools its batch statistics over both groups (the
only way the groups interact). ``share_groups=False`` uses grouped convs (one weight set per group).
"""
from __future__ import annotations

import torch
from torch import nn

POOLINGS = ("avg+max", "avg", "max")


class GroupedCoordinateAttention(nn.Module):
    """GCA: (B, C, H, W) float → (B, C, H, W), X modulated by per-group row and column attention.

    Args:
        channels: C, divisible by ``groups``.
        groups: G (paper: 2).
        reduction: r; the hidden width is m = max(1, C_g // r) (paper: r = 2).
        pooling: ``"avg+max"`` (paper: both, fused by addition), ``"avg"`` or ``"max"``.
        share_groups: one set of 1×1 convs for all groups (paper: "shared"); False = per group.
    """

    def __init__(self, channels: int, groups: int = 2, reduction: int = 2,
                 pooling: str = "avg+max", share_groups: bool = True):
        super().__init__()
        if channels % groups:
            raise ValueError(f"GCA: channels {channels} not divisible by groups {groups}")
        if pooling not in POOLINGS:
            raise ValueError(f"GCA: pooling must be one of {POOLINGS}, got {pooling!r}")
        self.groups, self.pooling, self.share_groups = groups, pooling, share_groups
        group_channels = channels // groups
        hidden = max(1, group_channels // reduction)
        # Shared: groups are folded into the batch, so the convs see C_g channels. Unshared: the
        # grouped convs see all C channels with G independent weight sets.
        n_sets = 1 if share_groups else groups
        self.reduce = nn.Conv2d(group_channels * n_sets, hidden * n_sets, 1, groups=n_sets)
        self.bn = nn.BatchNorm2d(hidden * n_sets)
        self.relu = nn.ReLU(inplace=True)
        self.expand = nn.Conv2d(hidden * n_sets, group_channels * n_sets, 1, groups=n_sets)

    def _pool(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Average and/or max over ``dim`` of (B, C, H, W), fused by addition."""
        if self.pooling == "avg":
            return x.mean(dim)
        if self.pooling == "max":
            return x.amax(dim)
        return x.mean(dim) + x.amax(dim)

    def attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention factors of ``x`` (B, C, H, W): A^h (B, C, H, 1) and A^w (B, C, 1, W)."""
        b, c, h, w = x.shape
        strips = torch.cat([self._pool(x, 3), self._pool(x, 2)], dim=2)  # (B, C, H+W)
        if self.share_groups:
            strips = strips.reshape(b * self.groups, c // self.groups, h + w, 1)
        else:
            strips = strips.reshape(b, c, h + w, 1)
        attn = torch.sigmoid(self.expand(self.relu(self.bn(self.reduce(strips)))))
        a_h, a_w = attn.reshape(b, c, h + w).split([h, w], dim=2)  # groups back to channels
        return a_h.unsqueeze(3), a_w.unsqueeze(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a_h, a_w = self.attention(x)
        return x * a_h * a_w


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck with optional GCA after conv3 + BN, before the residual sum.

    (B, C_in, H, W) → (B, 4·planes, H/stride, W/stride).

    Args:
        in_channels: C_in.
        planes: width of the 1×1 → 3×3 part; output is ``expansion · planes``.
        stride: stride of the 3×3 conv (v1.5 placement).
        gca: the attention module applied to the residual branch, or None (baseline).
        expansion: output/planes ratio (4 in ResNet-50).
    """

    def __init__(self, in_channels: int, planes: int, stride: int = 1,
                 gca: nn.Module | None = None, expansion: int = 4):
        super().__init__()
        out_channels = planes * expansion
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.gca = gca if gca is not None else nn.Identity()
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.gca(self.bn3(self.conv3(out)))
        return self.relu(out + shortcut)


class ResNetGCAEncoder(nn.Module):
    """ResNet encoder returning the stem output and the four stage outputs (Feat0..Feat4).

    x (B, C_in, H, W), H and W multiples of 32 → five tensors of strides 2, 4, 8, 16, 32 with
    ``stem_channels`` and ``expansion · planes[i]`` channels. The max-pool uses padding 0 and
    ``ceil_mode=True`` (bubbliiiing's "refined downsampling": H/2 → H/4 exactly for H = 32k).

    Args:
        in_channels: image channels.
        stem_channels: width of the 7×7 stem conv (64 in ResNet-50).
        planes: bottleneck widths per stage ((64, 128, 256, 512) in ResNet-50).
        blocks: bottlenecks per stage ((3, 4, 6, 3) in ResNet-50).
        use_gca: put GCA in every bottleneck.
        gca_kwargs: keyword arguments of ``GroupedCoordinateAttention`` (except ``channels``).
        expansion: bottleneck expansion (4).
    """

    def __init__(self, in_channels: int, stem_channels: int, planes: tuple[int, ...],
                 blocks: tuple[int, ...], use_gca: bool, gca_kwargs: dict, expansion: int = 4):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, stem_channels, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(stem_channels),
            nn.ReLU(inplace=True),
        )
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=0, ceil_mode=True)
        stages, channels = [], stem_channels
        for i, (width, depth) in enumerate(zip(planes, blocks)):
            layers = []
            for j in range(depth):
                stride = 2 if (i > 0 and j == 0) else 1
                gca = (GroupedCoordinateAttention(width * expansion, **gca_kwargs)
                       if use_gca else None)
                layers.append(Bottleneck(channels, width, stride, gca, expansion))
                channels = width * expansion
            stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)
        self.out_channels = (stem_channels, *(p * expansion for p in planes))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feat = self.stem(x)
        feats = [feat]
        feat = self.maxpool(feat)
        for stage in self.stages:
            feat = stage(feat)
            feats.append(feat)
        return feats
