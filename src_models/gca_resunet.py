"""GCA-ResUNet: ResNet-50 U-Net with Grouped Coordinate Attention in every bottleneck.

Paper: J. Ding, S. Gao, "GCA-ResUNet: Medical Image Segmentation Using Grouped Coordinate
Attention", arXiv 2511.14087 / 2512.23990. No official code exists; the paper's baseline and
training recipe match bubbliiiing/unet-pytorch (MIT) exactly, so its ``Unet(backbone="resnet50")``
is the structural reference for everything the paper leaves open (MODELS.md §5).

Faithful to the paper:
    * ResNet-50 encoder without avgpool/fc, five features Feat0..Feat4 (stem + 4 stages), trained
      from scratch; GCA after conv3 + BN of every bottleneck, before the residual sum (16 modules).
    * GCA with G = 2 groups, reduction r = 2, average + max strip pooling, a shared
      Conv1×1 → BN → ReLU → Conv1×1 → sigmoid bottleneck, attention split into A^h and A^w,
      Y_g = X_g ⊙ A^h ⊙ A^w (see ``resnet_gca``).
    * Decoder: per stage bilinear ×2 up-sampling, concat with the encoder feature, two 3×3 convs
      with ReLU (no norm); the extra convolutional stage at full resolution for ResNet-50; 1×1 head.
    * Loss L_CE + L_Dice, unweighted.

Choices the paper leaves open (MODELS.md §5.2–5.5):
    * Encoder/decoder layout as bubbliiiing: v1.5 bottleneck (stride on the 3×3 conv), max-pool
      (3, 2, padding 0, ceil_mode) — the paper's "refined downsampling"; ``cat([skip, up(deep)])``
      with align_corners=True bilinear up-sampling and biased decoder convs; widths 512/256/128/64.
      Inputs must be multiples of 32; up-sampled maps are interpolated straight to the skip's size
      (identical to ×2 when the sizes halve exactly, which they do for multiples of 32).
    * GCA: avg and max strips fused by addition (the only fusion matching the paper's +0.23 GMACs),
      one second conv then split (Eq. 4–5), biased 1×1 convs as CoordAtt, groups folded into the
      batch so the weights are shared (and BN statistics pool both groups in training).
    * Init: the paper only says "randomly initialized". Default ``init="kaiming"`` (He normal,
      fan_in); bubbliiiing's N(0, 0.02) is ``init="normal002"``. With N(0, 0.02) the norm-free
      decoder shrinks activations at every conv (std ≈ 0.02 at up_conv), so learning stalls: in a
      30-step check (AdamW 1e-4, batch 4, synthetic disks, bg/interior/boundary) the paper preset
      went 1.8–1.9 → 1.2–1.3 with normal002 vs 2.2–3.5 → 0.55 with kaiming (interior IoU 0 vs
      0.8); the lite preset 1.6–1.8 → 1.55–1.79 vs 1.2–2.6 → 0.9–1.7 (lr 1e-3: 1.04–1.13 vs
      0.54–0.66).
    * Dice as bubbliiiing: softmax, soft F1 over the whole batch per class, background included,
      smooth 1e-5. K = 1 uses sigmoid with the two-class [1 − p, p] form for the Dice term.

Parameter counts (in_channels = 3, num_classes = 9, MODELS.md §5.7–5.8): baseline (``gca_blocks=
"none"``) 43,933,321 = the paper's 43.93 M exactly; with GCA in all 16 bottlenecks 48,982,089. The
paper reports 44.98 M (+1.05 M), which is inconsistent with its own text: +1.05 M is exactly ONE
GCA module at C = 2048 (1,051,136 parameters), while its +0.23 GMACs matches GCA in all 16 blocks.
We implement all 16 as the paper describes and do not tune the design to hit 44.98 M.

GCA pools over whole rows and columns of the tile, so the network is not translation equivariant:
tile at the training size.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import ModelConfig, SegmentationModel
from .losses import masked_cross_entropy, one_hot, soft_dice_loss, targets_pixel_mask
from .registry import register
from .resnet_gca import POOLINGS, ResNetGCAEncoder

INITS = ("normal002", "kaiming")


@dataclass(frozen=True)
class GCAResUNetConfig(ModelConfig):
    """GCA-ResUNet configuration; defaults are the paper's ResNet-50 widths."""

    stem_channels: int = 64  # ResNet-50 7×7 stem width (Feat0 channels)
    planes: tuple[int, ...] = (64, 128, 256, 512)  # bottleneck widths; stage outputs are 4×
    blocks: tuple[int, ...] = (3, 4, 6, 3)  # ResNet-50 depths (16 bottlenecks)
    # up1..up4 output widths (bubbliiiing); up_conv keeps decoder_channels[0]
    decoder_channels: tuple[int, ...] = (64, 128, 256, 512)
    gca_blocks: str = "all"  # "all": GCA in every bottleneck (paper); "none": Res50-UNet baseline
    gca_groups: int = 2  # G, paper's best (Table 5: G=1 84.26, 2 86.11, 4 85.81)
    gca_reduction: int = 2  # r, paper's best (Table 6: 1 83.12, 2 86.11, 4 86.05, 8 82.10)
    gca_pooling: str = "avg+max"  # paper's best (Table 7); "avg" or "max" for the ablation
    gca_share_groups: bool = True  # one 1×1-conv pair for all groups ("shared", paper)
    # "kaiming" (He fan_in): in a 30-step check it trained far faster than bubbliiiing's
    # "normal002" N(0, 0.02), which starves the norm-free decoder of signal (module docstring).
    init: str = "kaiming"

    def __post_init__(self):
        if self.gca_blocks not in ("all", "none"):
            raise ValueError(f"gca_blocks must be 'all' or 'none', got {self.gca_blocks!r}")
        if self.gca_pooling not in POOLINGS:
            raise ValueError(f"gca_pooling must be one of {POOLINGS}, got {self.gca_pooling!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if len(self.planes) != 4 or len(self.blocks) != 4 or len(self.decoder_channels) != 4:
            raise ValueError("planes, blocks and decoder_channels need 4 entries (one per stage)")


def _conv_relu_pair(in_channels: int, out_channels: int) -> nn.Sequential:
    """Conv3×3 (bias) → ReLU → Conv3×3 (bias) → ReLU, no normalisation (paper §3.4)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1),
        nn.ReLU(inplace=True),
    )


def _upsample_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear, align_corners=True (= nn.UpsamplingBilinear2d ×2 when ``size`` is 2× x's)."""
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


class DecoderStage(nn.Module):
    """bubbliiiing ``unetUp``: (skip (B, C_s, 2h, 2w), deep (B, C_d, h, w)) → (B, C_out, 2h, 2w).

    The deep map is up-sampled to the skip's size and concatenated after the skip.
    """

    def __init__(self, skip_channels: int, deep_channels: int, out_channels: int):
        super().__init__()
        self.convs = _conv_relu_pair(skip_channels + deep_channels, out_channels)

    def forward(self, skip: torch.Tensor, deep: torch.Tensor) -> torch.Tensor:
        up = _upsample_to(deep, skip.shape[-2:])
        return self.convs(torch.cat([skip, up], dim=1))


def init_weights(module: nn.Module, scheme: str) -> None:
    """Initialise conv and BN layers of ``module`` in place.

    ``"normal002"``: bubbliiiing ``weights_init`` — conv weights N(0, 0.02), conv biases left at the
    PyTorch default, BN weight N(1, 0.02), BN bias 0. ``"kaiming"``: He normal (fan_in, ReLU) conv
    weights, zero conv biases, BN weight 1, BN bias 0. fan_in rather than torchvision's fan_out:
    the decoder has no normalisation, and fan_out blows its activations up (logit std ≈ 25 at init
    for the lite preset) while fan_in keeps them at unit scale.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            if scheme == "normal002":
                nn.init.normal_(m.weight, 0.0, 0.02)
            else:
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            if scheme == "normal002":
                nn.init.normal_(m.weight, 1.0, 0.02)
            else:
                nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class GCAResUNetLoss(nn.Module):
    """L = w_ce · CE + w_dice · Dice (paper: both 1), masked by ``targets["valid"]`` (CE also
    weighted by the optional ``targets["pixel_weight"]``).

    Args:
        ce_weight: weight of the cross-entropy term (BCE when K = 1).
        dice_weight: weight of the batch-level soft Dice term (background included).
        smooth: Dice smoothing (bubbliiiing 1e-5).
    """

    def __init__(self, ce_weight: float = 1.0, dice_weight: float = 1.0, smooth: float = 1e-5):
        super().__init__()
        self.ce_weight, self.dice_weight, self.smooth = ce_weight, dice_weight, smooth

    def forward(self, outputs: dict, targets: dict) -> dict[str, torch.Tensor]:
        """outputs["logits"] (B, K, H, W); targets["labels"] (B, H, W) int64, optional "valid"."""
        logits, labels, valid = outputs["logits"], targets["labels"].long(), targets.get("valid")
        if valid is not None:
            # Unsupervised pixels may carry any label (e.g. an ignore value): make it a valid index.
            labels = labels.masked_fill(valid <= 0, 0)
        ce = masked_cross_entropy(logits, labels, targets_pixel_mask(targets))
        if logits.shape[1] == 1:
            fg = torch.sigmoid(logits)
            probs = torch.cat([1.0 - fg, fg], dim=1)
        else:
            probs = torch.softmax(logits, dim=1)
        dice = soft_dice_loss(probs, one_hot(labels, probs.shape[1]), valid,
                              include_background=True, smooth=self.smooth, per_class=True)
        ce, dice = self.ce_weight * ce, self.dice_weight * dice
        return {"loss": ce + dice, "ce": ce, "dice": dice}


# Lite: encoder ÷4 (same 3-4-6-3 depths, 16 GCA modules), decoder ÷8. At ÷4 the bubbliiiing
# decoder holds 74 % of the MACs (1.47 → 0.75 GMAC per 256² image with the decoder at ÷8) and the
# full-resolution up_conv dominates CPU time. 2,364,251 parameters; a batch-8 256² training step
# took 1.13–1.17 s on 2 threads (shared machine, load ≈ 3); a ÷4 decoder (3.08 M) needs ≈ 1.6× the
# CPU time.
_LITE = dict(stem_channels=16, planes=(16, 32, 64, 128), blocks=(3, 4, 6, 3),
             decoder_channels=(8, 16, 32, 64))


@register
class GCAResUNet(SegmentationModel):
    """GCA-ResUNet: x (B, C_in, H, W) float32, H, W multiples of 32 → {"logits": (B, K, H, W)}."""

    name = "gca_resunet"
    paper = "Ding & Gao, GCA-ResUNet (arXiv 2511.14087, 2025)"
    description = "ResNet-50 U-Net with grouped coordinate attention in every bottleneck"
    config_class = GCAResUNetConfig
    presets = {
        "paper": dict(in_channels=3, num_classes=3),
        "lite": dict(in_channels=3, num_classes=3, **_LITE),
    }
    aux_kinds = ()
    translation_equivariant = False  # GCA pools over whole rows/columns of the tile
    channels_last_on_cpu = False     # its row/column pooling ran 1.23x slower on NHWC input (session 20)
    size_multiple = 32

    def __init__(self, config: GCAResUNetConfig):
        super().__init__(config)
        gca_kwargs = dict(groups=config.gca_groups, reduction=config.gca_reduction,
                          pooling=config.gca_pooling, share_groups=config.gca_share_groups)
        self.encoder = ResNetGCAEncoder(
            config.in_channels, config.stem_channels, config.planes, config.blocks,
            use_gca=config.gca_blocks == "all", gca_kwargs=gca_kwargs)
        enc, dec = self.encoder.out_channels, config.decoder_channels
        # Deep → shallow: up4 (Feat3, Feat4), up3 (Feat2, up4), up2 (Feat1, up3), up1 (Feat0, up2).
        deep_channels = (enc[4], *dec[:0:-1])
        self.decoder = nn.ModuleList(
            DecoderStage(enc[3 - i], deep_channels[i], dec[3 - i]) for i in range(4))
        # "Additional convolutional layer at the final decoding stage" for ResNet-50: H/2 → H.
        self.up_conv = _conv_relu_pair(dec[0], dec[0])
        self.final = nn.Conv2d(dec[0], config.num_classes, 1)
        init_weights(self, config.init)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x (B, C_in, H, W) float32 → {"logits": (B, K, H, W)} in both training and eval mode."""
        self.check_input(x)
        feats = self.encoder(x)
        out = feats[4]
        for i, stage in enumerate(self.decoder):
            out = stage(feats[3 - i], out)
        out = self.up_conv(_upsample_to(out, x.shape[-2:]))
        return {"logits": self.final(out)}

    def make_loss(self, **kwargs) -> nn.Module:
        """CE + Dice (unweighted by default); kwargs go to ``GCAResUNetLoss``."""
        return GCAResUNetLoss(**kwargs)
