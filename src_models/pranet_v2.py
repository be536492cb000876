"""PraNet-V2: dual-supervised reverse attention (DSRA) on a Res2Net-50 encoder.

Paper: Hu, Ji, Shao, Fan, "PraNet-V2: Dual-supervised reverse attention for medical image
segmentation", Computational Visual Media 2026 (papers/pranet_v2_dsra.txt; MODELS.md §3).

Faithful to the paper and the authors' MIT code (ai4colonoscopy/PraNet-V2 ``binary/lib/pranet.py``):

* Res2Net-50 v1b 26w4s encoder (``res2net.py``) → F1..F4 at strides 4, 8, 16, 32.
* RFB_modified (→ 32 channels) on F2, F3, F4, then PraNet-V1's parallel partial decoder with two 1×1
  output convs (foreground, background) → R4 = {R4^F, R4^B} at stride 8.
* DSRA3 on F4, DSRA2 on F3, DSRA1 on F2 (Eqs. 1–4): shared convs φ, separate fg/bg heads P^F, P^B;
  reverse gain γ = Softmax_C(I(R_{i+1}^F) − I(R_{i+1}^B)) (bilinear resize of the deeper stage's
  logits to this stage); R_i^F = P_i^F + P_i^F∘γ, R_i^B = P_i^B. Gain acts in label space only.
* BasicConv2d = conv (no bias) + BN with *no* activation, as in the code; ReLU only after the
  RFB sum and after the inner DSRA convs (not after the first 1×1 nor the heads).
* All 8 maps upsampled bilinearly (align_corners=False) to the input size; inference uses Σ_i R_i^F.
* Losses (:mod:`.pranet_v2_loss`): multi-class 0.5·CE + 0.7·Dice (TransUNet: softmax, squared
  denominators, incl. class 0) + 0.3·BCE(R^B, 1 − one_hot(y)) per supervised output, the weights of
  the authors' trainers; binary: the code's ``structure_loss`` wBCE + wIoU + 0.8·wBCE(R^B, 1 − G) per stage.
* Preset "paper" with in_channels=3, num_classes=1 has exactly 30,499,830 parameters (MODELS.md §7.3);
  the unused ImageNet fc (2,049,000) and 1→3 input adapter (12) of the official class are not built.

Choices the paper leaves open (and why):

* ``gain="softmax"`` (default, faithful). For C = 1 a softmax over one channel is identically 1, so
  γ ≡ 1 and R_i^F = 2·P_i^F: deeper stages then do not reach shallower ones in the forward pass —
  exactly the released binary model. ``gain="sigmoid"`` (ours) uses σ(ΔR), restoring the cascade.
* ``supervision="deep"`` supervises each of the 4 stage outputs (PraNet style); ``"mutation"``
  supervises all 15 non-empty subsets with summed logits (the authors' MIST/EMCAD/MERIT runs).
* Grey input: the first stem conv takes ``in_channels`` directly instead of the code's 1→3 adapter.
* No ImageNet weights (not downloadable): the encoder is He-initialised and trained from scratch.
* The "valid" mask: unsupervised pixels are dropped from every term; in the binary boundary weight
  w = 1 + 5|AvgPool31(G) − G| they count as 0 (like the code's zero padding at the image border), so
  labels outside the mask cannot change the loss.
* Disagreement map (MODELS.md §3.7): u = Σ_c p_c·|p_c − (1 − q_c)| with p = softmax(Σ R^F) and
  q = σ(R_1^B); for C = 1 the implicit background class is included, giving u = |p − (1 − q)|.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import MapSpec, ModelConfig, SegmentationModel
from .pranet_v2_loss import BINARY_LOSSES, SUPERVISIONS, PraNetV2Loss
from .registry import register
from .res2net import Res2NetEncoder

GAINS = ("softmax", "sigmoid")


@dataclass(frozen=True)
class PraNetV2Config(ModelConfig):
    """PraNet-V2 configuration (defaults = the paper's Res2Net-50 model).

    Attributes:
        stem_width: width of the first two deep-stem convs (Res2Net-50 v1b: 32).
        stage_planes: Bottle2neck planes per stage (outputs are 4×: 256, 512, 1024, 2048).
        layers: Bottle2neck blocks per stage (Res2Net-50: 3, 4, 6, 3).
        base_width: Res2Net "26w": split width ⌊planes·base_width/64⌋.
        scale: Res2Net "4s": number of hierarchical splits.
        rfb_channels: RFB / partial-decoder width (paper code: 32).
        dsra3_width: DSRA3 width on F4 (code: 256, three 5×5 convs).
        dsra_width: DSRA2/DSRA1 width on F3/F2 (code: 64, two 3×3 convs).
        gain: reverse gain, "softmax" (paper; ≡ 1 when num_classes = 1) or "sigmoid" (ours).
        supervision: loss on the 4 stage outputs ("deep") or on all 15 summed subsets ("mutation").
        binary_loss: for num_classes = 1, the code's "structure" loss (wBCE + wIoU + 0.8 wBCE bg)
            or the paper's "generic" CE/Dice/BCE form.
    """

    stem_width: int = 32
    stage_planes: tuple[int, int, int, int] = (64, 128, 256, 512)
    layers: tuple[int, int, int, int] = (3, 4, 6, 3)
    base_width: int = 26
    scale: int = 4
    rfb_channels: int = 32
    dsra3_width: int = 256
    dsra_width: int = 64
    gain: str = "softmax"
    supervision: str = "deep"
    binary_loss: str = "structure"

    def __post_init__(self):
        for field, choices in (("gain", GAINS), ("supervision", SUPERVISIONS),
                               ("binary_loss", BINARY_LOSSES)):
            if getattr(self, field) not in choices:
                raise ValueError(f"{field} must be one of {choices}, got {getattr(self, field)!r}")


class BasicConv2d(nn.Sequential):
    """Conv (no bias) + BN, deliberately without activation (as in PraNet's code).

    (B, C_in, H, W) → (B, C_out, H', W').
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, padding=0, dilation=1):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation,
                      bias=False),
            nn.BatchNorm2d(out_channels),
        )


class RFBModified(nn.Module):
    """Receptive-field block: a 1×1 branch and three (1×1, 1×k, k×1, 3×3 dilation k) branches.

    (B, C_in, H, W) → (B, C_out, H, W); out = ReLU(conv_cat(concat branches) + conv_res(x)).
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        c = out_channels
        branches = [BasicConv2d(in_channels, c, 1)]
        for k in (3, 5, 7):
            branches.append(nn.Sequential(
                BasicConv2d(in_channels, c, 1),
                BasicConv2d(c, c, (1, k), padding=(0, k // 2)),
                BasicConv2d(c, c, (k, 1), padding=(k // 2, 0)),
                BasicConv2d(c, c, 3, padding=k, dilation=k),
            ))
        self.branches = nn.ModuleList(branches)
        self.conv_cat = BasicConv2d(4 * c, c, 3, padding=1)
        self.conv_res = BasicConv2d(in_channels, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cat = torch.cat([branch(x) for branch in self.branches], dim=1)
        return F.relu(self.conv_cat(cat) + self.conv_res(x))


class PartialDecoder(nn.Module):
    """PraNet-V1 parallel partial decoder with V2's two output convs (stage 1 of the decoder).

    Call ``(r4, r3, r2)``: (B, c, h, w), (B, c, 2h, 2w), (B, c, 4h, 4w) →
    ``(R4^F, R4^B)``, each (B, K, 4h, 4w) logits.
    """

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        c = channels
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
        self.conv_up1, self.conv_up2, self.conv_up3, self.conv_up4 = (
            BasicConv2d(c, c, 3, padding=1) for _ in range(4))
        self.conv_up5 = BasicConv2d(2 * c, 2 * c, 3, padding=1)
        self.conv_concat2 = BasicConv2d(2 * c, 2 * c, 3, padding=1)
        self.conv_concat3 = BasicConv2d(3 * c, 3 * c, 3, padding=1)
        self.conv4 = BasicConv2d(3 * c, 3 * c, 3, padding=1)
        self.out_fg = nn.Conv2d(3 * c, num_classes, 1)
        self.out_bg = nn.Conv2d(3 * c, num_classes, 1)

    def forward(self, r4, r3, r2) -> tuple[torch.Tensor, torch.Tensor]:
        up = self.up
        x2_1 = self.conv_up1(up(r4)) * r3
        x3_1 = self.conv_up2(up(up(r4))) * self.conv_up3(up(r3)) * r2
        x2_2 = self.conv_concat2(torch.cat([x2_1, self.conv_up4(up(r4))], dim=1))
        x3_2 = self.conv_concat3(torch.cat([x3_1, self.conv_up5(up(x2_2))], dim=1))
        x = self.conv4(x3_2)
        return self.out_fg(x), self.out_bg(x)


class DSRA(nn.Module):
    """Dual-supervised reverse attention decoder stage (paper Eqs. 1–4).

    φ = BasicConv 1×1 (C_in → width) → [BasicConv k×k → ReLU] × n_convs, then two heads
    BasicConv (width → K) giving P^F and P^B. Call ``(feature, prev_fg, prev_bg)`` with feature
    (B, C_in, h, w) and the deeper stage's logits (B, K, h', w') → ``(R^F, R^B)`` (B, K, h, w).
    """

    def __init__(self, in_channels: int, width: int, n_convs: int, kernel: int, head_kernel: int,
                 num_classes: int, gain: str = "softmax"):
        super().__init__()
        if gain not in GAINS:
            raise ValueError(f"gain must be one of {GAINS}, got {gain!r}")
        body = [BasicConv2d(in_channels, width, 1)]
        for _ in range(n_convs):
            body += [BasicConv2d(width, width, kernel, padding=kernel // 2), nn.ReLU(inplace=True)]
        self.body = nn.Sequential(*body)
        self.head_fg = BasicConv2d(width, num_classes, head_kernel, padding=head_kernel // 2)
        self.head_bg = BasicConv2d(width, num_classes, head_kernel, padding=head_kernel // 2)
        self.gain = gain

    def heads(self, feature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 3: {P^F, P^B} = φ(F), each (B, K, h, w)."""
        x = self.body(feature)
        return self.head_fg(x), self.head_bg(x)

    def reverse_gain(self, prev_fg: torch.Tensor, prev_bg: torch.Tensor, size) -> torch.Tensor:
        """Eq. 4: γ = Softmax_K(I(R^F_{i+1}) − I(R^B_{i+1})) (or σ of it), (B, K, *size)."""
        delta = (F.interpolate(prev_fg, size=size, mode="bilinear", align_corners=False)
                 - F.interpolate(prev_bg, size=size, mode="bilinear", align_corners=False))
        return torch.softmax(delta, dim=1) if self.gain == "softmax" else torch.sigmoid(delta)

    def forward(self, feature, prev_fg, prev_bg) -> tuple[torch.Tensor, torch.Tensor]:
        p_fg, p_bg = self.heads(feature)
        gamma = self.reverse_gain(prev_fg, prev_bg, p_fg.shape[-2:])
        return p_fg + p_fg * gamma, p_bg  # Eqs. 1 and 2


def fg_bg_disagreement(probs: torch.Tensor, not_class: torch.Tensor) -> torch.Tensor:
    """Where the foreground and background heads disagree (MODELS.md §3.7).

    Args:
        probs: (B, K, H, W) class probabilities p from Σ R^F (sigmoid for K = 1).
        not_class: (B, K, H, W) q = σ(R^B), the background heads' "pixel is not class c".

    Returns:
        (B, 1, H, W) u = Σ_c p_c·|p_c − (1 − q_c)| in [0, 1]; for K = 1 the implicit background
        class is included, which gives |p − (1 − q)|.
    """
    gap = (probs - (1.0 - not_class)).abs()
    if probs.shape[1] == 1:
        return gap
    return (probs * gap).sum(dim=1, keepdim=True)


@register
class PraNetV2(SegmentationModel):
    """PraNet-V2 (Res2Net-50 + RFB + partial decoder + DSRA3/2/1).

    ``forward``: (B, C_in, H, W) float32 → ``{"fg": [R1^F..R4^F], "bg": [R1^B..R4^B],
    "logits": Σ_i R_i^F}``, every tensor (B, K, H, W) logits at input resolution (same in train and
    eval mode; R1 is the finest stage, R4 the partial decoder's coarse map).
    """

    name = "pranet_v2"
    paper = "Hu, Ji, Shao, Fan. PraNet-V2: Dual-supervised reverse attention. CVM 2026"
    description = ("Res2Net encoder + reverse-attention decoder with explicit per-class background "
                   "heads; offers background and fg/bg-disagreement maps")
    config_class = PraNetV2Config
    presets = {
        "paper": {"in_channels": 3, "num_classes": 3},
        "lite": {"in_channels": 3, "num_classes": 3, "stem_width": 16,
                 "stage_planes": (16, 32, 64, 128), "layers": (2, 2, 2, 2),
                 "rfb_channels": 16, "dsra3_width": 64, "dsra_width": 32},
    }
    aux_kinds = ("background",)
    translation_equivariant = True
    size_multiple = 32

    def __init__(self, config: PraNetV2Config):
        super().__init__(config)
        k, r = config.num_classes, config.rfb_channels
        self.encoder = Res2NetEncoder(config.in_channels, config.stem_width, config.stage_planes,
                                      config.layers, config.base_width, config.scale)
        _, c2, c3, c4 = self.encoder.out_channels
        self.rfb2, self.rfb3, self.rfb4 = RFBModified(c2, r), RFBModified(c3, r), RFBModified(c4, r)
        self.decoder = PartialDecoder(r, k)
        self.dsra3 = DSRA(c4, config.dsra3_width, 3, 5, 1, k, config.gain)
        self.dsra2 = DSRA(c3, config.dsra_width, 2, 3, 3, k, config.gain)
        self.dsra1 = DSRA(c2, config.dsra_width, 2, 3, 3, k, config.gain)

    def stage_maps(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """[(R1^F, R1^B), …, (R4^F, R4^B)] at their own strides 8, 16, 32, 8 (not upsampled)."""
        _, f2, f3, f4 = self.encoder(x)
        r4_fg, r4_bg = self.decoder(self.rfb4(f4), self.rfb3(f3), self.rfb2(f2))
        r3_fg, r3_bg = self.dsra3(f4, r4_fg, r4_bg)
        r2_fg, r2_bg = self.dsra2(f3, r3_fg, r3_bg)
        r1_fg, r1_bg = self.dsra1(f2, r2_fg, r2_bg)
        return [(r1_fg, r1_bg), (r2_fg, r2_bg), (r3_fg, r3_bg), (r4_fg, r4_bg)]

    def forward(self, x: torch.Tensor) -> dict:
        self.check_input(x)
        size = x.shape[-2:]
        fg, bg = [], []
        for r_fg, r_bg in self.stage_maps(x):
            fg.append(F.interpolate(r_fg, size=size, mode="bilinear", align_corners=False))
            bg.append(F.interpolate(r_bg, size=size, mode="bilinear", align_corners=False))
        return {"logits": torch.stack(fg).sum(0), "fg": fg, "bg": bg}

    def map_specs(self, mc_samples: int = 0) -> list[MapSpec]:
        k = self.config.num_classes
        specs = super().map_specs(mc_samples)
        for i in range(1, 5):
            specs.append(MapSpec(f"background_stage{i}", k, "background", (0.0, 1.0),
                                 f"stage {i} background heads: probability the pixel is NOT each class"))
        specs.append(MapSpec("disagreement", 1, "background", (0.0, 1.0),
                             "disagreement of foreground and stage-1 background heads (uncertainty)"))
        return specs

    def _predict_padded(self, x: torch.Tensor, mc_samples: int) -> dict[str, torch.Tensor]:
        out = self(x)
        probs = self.class_probabilities(out["logits"])
        maps = {"probs": probs}
        for i, r_bg in enumerate(out["bg"], start=1):
            maps[f"background_stage{i}"] = torch.sigmoid(r_bg)
        maps["disagreement"] = fg_bg_disagreement(probs, maps["background_stage1"])
        return maps

    def make_loss(self, **kwargs) -> nn.Module:
        """The PraNet-V2 loss; kwargs override ``PraNetV2Loss`` arguments (e.g. supervision)."""
        options = {"supervision": self.config.supervision, "binary_loss": self.config.binary_loss}
        return PraNetV2Loss(self.config.num_classes, **{**options, **kwargs})
