"""ReSeg-UNet: reconstruction-guided two-stage training of a U-Net.

Paper: L. Li, D. Tang, X. Chu, X. Yang, F. Yu, "ReSeg-UNet: A Reconstruction-Guided Optimization
Framework for Enhanced Medical Image Segmentation", MICCAI 2025 (code: github.com/Li-gzhu/ReSeg-UNet,
read at 19cd5ce; learnt from, not copied). Spec: MODELS.md §2.

ReSeg-UNet is a training scheme around an unchanged U-shaped network:

* Stage 1 (reconstruction, ``pretrain_stage``): a second network of the same architecture maps the
  ground-truth label map to the image, trained with ``0.6·MSE + 0.4·L1`` (paper Eqs. 1–3).
* Stage 2 (segmentation, ``make_loss(recon_net=...)``): the reconstruction net is frozen and run on the
  labels; the segmentation net is trained with ``L_seg + λ·L_align``, λ = 0.035 (Eq. 8), where
  ``L_align = (1/3)[Σ_l MSE(Seg-D_l, Recon-E_l) + MSE(Seg-E_l, Recon-D_l) + MSE(Seg-in, Recon-in)]``
  over the three levels below the bottleneck (Eqs. 4–7). Each MSE is a mean over C·H·W (and batch).
* At inference it is a plain U-Net; the reconstruction net is not used.

Faithful to paper and code: milesial-style U-Net (DoubleConv = 2×[3×3 conv, no bias → BN → ReLU],
max-pool down, ConvTranspose2d(c, c/2, 2, 2) up, concat [skip, up], 1×1 head), widths
64-128-256-512-1024 in the "paper" preset (31,038,153 parameters for 3 → 9 classes); λ, α, β;
reconstruction input = label indices as float repeated to the input channels (not one-hot, not
normalised, as the official ``UNet_hd``); reconstruction output with ``num_classes`` channels that
each regress the image (the official code's broadcast); L_seg = 0.5·CE + 0.5·Dice with TransUNet's
Dice (softmax, squared denominators, smoothing 1e-5, background included); the frozen net's
BatchNorm left in training mode (batch statistics), as the official stage-2 script does.

Choices where the paper is silent or paper and code disagree (config fields, defaults argued in
MODELS.md §2.4):

* ``mid``: the "in" term aligns the bottleneck x5 (paper text, default) or the first decoder stage
  d1 (``"first_decoder"``, what the official code does).
* ``recon_bn``: ``"train"`` (official) or ``"eval"`` (frozen running statistics). With ``"train"`` the
  frozen net's running statistics still move during stage 2; its weights never do. Calling
  ``.eval()`` on the loss module also switches the frozen net to eval mode (clean validation).
* ``recon_input="onehot"`` and ``recon_output="image"`` are cleaner non-official variants.
* Stage-1 target when output and image channel counts differ: a 1-channel image is expanded over the
  output channels (official broadcast, done with ``expand_as`` so PyTorch does not warn); a
  multi-channel image is averaged over channels first, so every output channel regresses the
  channel-mean image (for a grey image repeated to RGB this is the grey image itself). When the counts
  are equal (e.g. RGB with 3 classes) channel k regresses image channel k.
* K = 1 (binary): CE is BCE with logits; Dice uses the two-channel [1 − p, p] so that background is
  included as in the multi-class case.

Our additions for this project: pixel terms honour ``targets["valid"]`` (CE, Dice and the stage-1
reconstruction loss average over supervised pixels only). The alignment terms compare whole feature
maps and are not masked: features have receptive fields far larger than one pixel, so a pixel mask
has no clean meaning there. With ``recon_net=None`` (e.g. fine-tuning on user edits without the
reconstruction net) the loss is L_seg alone, i.e. a plain U-Net objective.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import ModelConfig, PretrainStage, SegmentationModel
from .blocks import DoubleConv
from .losses import masked_cross_entropy, one_hot, soft_dice_loss, targets_pixel_mask, targets_valid
from .registry import register

_MID_CHOICES = ("bottleneck", "first_decoder")
_RECON_INPUT_CHOICES = ("index", "onehot")
_RECON_OUTPUT_CHOICES = ("classes", "image")
_RECON_BN_CHOICES = ("train", "eval")


@dataclass(frozen=True)
class ReSegUNetConfig(ModelConfig):
    """ReSeg-UNet settings (MODELS.md §2).

    Attributes:
        base_width: channels of the first U-Net stage; stages are ×1, ×2, ×4, ×8, ×16 (paper 64).
        mid: which feature the "in" alignment term compares: "bottleneck" (paper) or
            "first_decoder" (official code's ``bridge_x``).
        recon_input: reconstruction-net input: "index" (label indices as float repeated to
            ``in_channels``, official) or "onehot" (one-hot labels, max(K, 2) channels).
        recon_output: reconstruction-net output channels: "classes" (``num_classes``, official;
            every channel regresses the image) or "image" (``in_channels``).
        recon_bn: BatchNorm mode of the frozen reconstruction net in stage 2: "train" (official) or
            "eval".
        align_weight: λ, weight of L_align in stage 2 (paper 0.035, its ablation optimum).
        ce_weight: weight of cross-entropy in L_seg (paper: unspecified; official code 0.5).
        dice_weight: weight of Dice in L_seg (paper: unspecified; official code 0.5).
        recon_mse_weight: α of the reconstruction loss (paper 0.6).
        recon_l1_weight: β of the reconstruction loss (paper 0.4).
    """

    base_width: int = 64
    mid: str = "bottleneck"
    recon_input: str = "index"
    recon_output: str = "classes"
    recon_bn: str = "train"
    align_weight: float = 0.035
    ce_weight: float = 0.5
    dice_weight: float = 0.5
    recon_mse_weight: float = 0.6
    recon_l1_weight: float = 0.4

    def __post_init__(self):
        for field, choices in (("mid", _MID_CHOICES), ("recon_input", _RECON_INPUT_CHOICES),
                               ("recon_output", _RECON_OUTPUT_CHOICES),
                               ("recon_bn", _RECON_BN_CHOICES)):
            if getattr(self, field) not in choices:
                raise ValueError(f"ReSegUNetConfig.{field} must be one of {choices}, "
                                 f"got {getattr(self, field)!r}")
        if self.base_width < 1:
            raise ValueError(f"ReSegUNetConfig.base_width must be positive, got {self.base_width}")


class Down(nn.Sequential):
    """2×2 max-pool then DoubleConv: (B, C_in, H, W) → (B, C_out, H/2, W/2)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(nn.MaxPool2d(2), DoubleConv(in_channels, out_channels))


class Up(nn.Module):
    """Transposed-conv upsampling, concat with the skip, DoubleConv.

    (B, C_in, h, w) deep, (B, C_in/2, 2h, 2w) skip → (B, C_out, 2h, 2w).
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, in_channels // 2, kernel_size=2, stride=2)
        self.conv = DoubleConv(in_channels, out_channels)

    def forward(self, deep: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, self.up(deep)], dim=1))


def recon_input_channels(config: ReSegUNetConfig) -> int:
    """Channels of the reconstruction net's input for ``config.recon_input``."""
    return config.in_channels if config.recon_input == "index" else max(config.num_classes, 2)


def make_recon_input(targets: dict, config: ReSegUNetConfig) -> torch.Tensor:
    """Reconstruction-net input from ``targets["labels"]`` (B, H, W) int64.

    Returns:
        ``(B, C, H, W) float32``: label indices as float repeated to ``in_channels`` ("index", the
        official raw values 0..K−1) or a one-hot map with max(K, 2) channels ("onehot").
    """
    labels = targets["labels"]
    if config.recon_input == "onehot":
        return one_hot(labels, max(config.num_classes, 2))
    return labels[:, None].float().expand(-1, config.in_channels, -1, -1).contiguous()


@register
class ReSegUNet(SegmentationModel):
    """U-Net trained with ReSeg-UNet's reconstruction-guided feature alignment.

    ``forward(x)``: ``x`` (B, C_in, H, W) float32, H and W multiples of 16. Training mode returns
    ``{"logits": (B, K, H, W), "enc": [x4, x3, x2], "dec": [d1, d2, d3], "bottleneck": x5,
    "mid_code": d1}`` (lists ordered deep → shallow so that ``enc[l]`` and ``dec[l]`` have equal
    shapes: 8b×H/8, 4b×H/4, 2b×H/2 for base width b; x5 is 16b×H/16). Eval mode returns
    ``{"logits"}``.
    """

    name = "reseg_unet"
    paper = "Li et al., ReSeg-UNet: reconstruction-guided optimization, MICCAI 2025"
    description = ("U-Net trained in two stages: label→image reconstruction, "
                   "then feature-aligned segmentation")
    config_class = ReSegUNetConfig
    presets = {
        "paper": {"in_channels": 3, "num_classes": 3, "base_width": 64},
        "lite": {"in_channels": 3, "num_classes": 3, "base_width": 16},
    }
    aux_kinds = ()
    translation_equivariant = True
    size_multiple = 16

    def __init__(self, config: ReSegUNetConfig):
        super().__init__(config)
        b = config.base_width
        self.inc = DoubleConv(config.in_channels, b)
        self.down1, self.down2 = Down(b, 2 * b), Down(2 * b, 4 * b)
        self.down3, self.down4 = Down(4 * b, 8 * b), Down(8 * b, 16 * b)
        self.up1, self.up2 = Up(16 * b, 8 * b), Up(8 * b, 4 * b)
        self.up3, self.up4 = Up(4 * b, 2 * b), Up(2 * b, b)
        self.head = nn.Conv2d(b, config.num_classes, kernel_size=1)

    def features(self, x: torch.Tensor) -> dict:
        """Logits and the alignment features in any mode (the training-mode dict of ``forward``)."""
        self.check_input(x)
        x1 = self.inc(x)
        x2 = self.down1(x1)           # 2b × H/2   (level 3)
        x3 = self.down2(x2)           # 4b × H/4   (level 2)
        x4 = self.down3(x3)           # 8b × H/8   (level 1)
        x5 = self.down4(x4)           # 16b × H/16 (bottleneck, the paper's "in")
        d1 = self.up1(x5, x4)         # 8b × H/8   (the official code's "bridge_x")
        d2 = self.up2(d1, x3)
        d3 = self.up3(d2, x2)
        logits = self.head(self.up4(d3, x1))
        return {"logits": logits, "enc": [x4, x3, x2], "dec": [d1, d2, d3],
                "bottleneck": x5, "mid_code": d1}

    def forward(self, x: torch.Tensor) -> dict:
        out = self.features(x)
        return out if self.training else {"logits": out["logits"]}

    def build_recon_net(self) -> "ReSegUNet":
        """A fresh reconstruction net: same architecture, input/output channels per the config."""
        cfg = self.config
        out_channels = cfg.num_classes if cfg.recon_output == "classes" else cfg.in_channels
        return ReSegUNet(dataclasses.replace(
            cfg, in_channels=recon_input_channels(cfg), num_classes=out_channels))

    def pretrain_stage(self) -> PretrainStage:
        """Stage 1: train a same-architecture net to reconstruct the image from the labels."""
        cfg = self.config
        return PretrainStage(
            name="reconstruction",
            network=self.build_recon_net(),
            loss=ReconstructionLoss(cfg.recon_mse_weight, cfg.recon_l1_weight),
            make_input=functools.partial(make_recon_input, config=cfg),
            loss_kwarg="recon_net",
        )

    def make_loss(self, recon_net: "ReSegUNet | None" = None) -> nn.Module:
        """Stage-2 loss ``L_seg + λ·L_align``; with ``recon_net=None`` just ``L_seg``.

        Args:
            recon_net: the network trained by ``pretrain_stage``. It is frozen in place
                (``requires_grad_(False)`` on all its parameters) and kept by the loss module.
        """
        return ReSegLoss(self.config, recon_net)


def reconstruction_target(image: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """The image each reconstruction channel regresses, shaped like ``recon`` (B, C_out, H, W).

    Equal channel counts compare channel by channel; a 1-channel image is expanded (the official
    broadcast); otherwise each output channel regresses the channel-mean image.
    """
    if image.shape[1] == recon.shape[1]:
        return image
    if image.shape[1] > 1:
        image = image.mean(dim=1, keepdim=True)
    return image.expand_as(recon)


class ReconstructionLoss(nn.Module):
    """Stage-1 loss ``α·MSE + β·L1`` (paper Eq. 3) over supervised pixels.

    ``outputs["logits"]`` (B, C_out, H, W) is the reconstruction; ``targets["image"]``
    (B, C_in, H, W) the image; optional ``targets["valid"]`` (B, H, W) masks pixels whose labels
    (the network input) are not trustworthy. Returns ``{"loss", "mse", "l1"}`` (weighted terms).
    """

    def __init__(self, mse_weight: float = 0.6, l1_weight: float = 0.4):
        super().__init__()
        self.mse_weight, self.l1_weight = mse_weight, l1_weight

    def forward(self, outputs: dict, targets: dict) -> dict:
        recon = outputs["logits"]
        target = reconstruction_target(targets["image"].to(recon.dtype), recon)
        valid = targets_valid(targets)
        if valid is None:
            mse, l1 = F.mse_loss(recon, target), F.l1_loss(recon, target)
        else:
            mask = valid.to(recon.dtype)[:, None].expand_as(recon)
            count = mask.sum().clamp_min(1.0)
            diff = recon - target
            mse, l1 = (diff.square() * mask).sum() / count, (diff.abs() * mask).sum() / count
        mse, l1 = self.mse_weight * mse, self.l1_weight * l1
        return {"loss": mse + l1, "mse": mse, "l1": l1}


def _feature_mse(seg: torch.Tensor, rec: torch.Tensor) -> torch.Tensor:
    """Mean squared error over B·C·H·W of two equally shaped feature maps (paper Eqs. 4–6)."""
    if seg.shape != rec.shape:
        raise ValueError(f"alignment pair shapes differ: {tuple(seg.shape)} vs {tuple(rec.shape)}")
    return F.mse_loss(seg, rec)


def alignment_loss(seg: dict, rec: dict, mid: str = "bottleneck") -> torch.Tensor:
    """``L_align`` (paper Eq. 7) between segmentation and reconstruction feature dicts.

    Args:
        seg, rec: training-mode ``forward`` dicts (``"enc"``, ``"dec"`` deep → shallow,
            ``"bottleneck"``, ``"mid_code"``).
        mid: "bottleneck" (x5) or "first_decoder" (d1) for the "in" term.
    """
    key = "bottleneck" if mid == "bottleneck" else "mid_code"
    total = _feature_mse(seg[key], rec[key])
    for enc_s, dec_s, enc_r, dec_r in zip(seg["enc"], seg["dec"], rec["enc"], rec["dec"]):
        total = total + _feature_mse(dec_s, enc_r) + _feature_mse(enc_s, dec_r)
    return total / 3.0


def segmentation_terms(logits: torch.Tensor, labels: torch.Tensor, valid, ce_weight: float,
                       dice_weight: float, ce_mask=None) -> dict:
    """Weighted ``{"ce", "dice"}`` of L_seg; both average over supervised pixels only.

    Args:
        logits: ``(B, K, H, W)``; K = 1 is binary (BCE, Dice over [1 − p, p]).
        labels: ``(B, H, W) int64``.
        valid: ``None`` or ``(B, H, W)`` mask.
        ce_mask: ``None`` (use ``valid``) or a ``(B, H, W)`` weighted mask for the CE term.
    """
    if logits.shape[1] == 1:
        fg = torch.sigmoid(logits)
        probs, target = torch.cat([1 - fg, fg], dim=1), one_hot(labels, 2)
    else:
        probs, target = torch.softmax(logits, dim=1), one_hot(labels, logits.shape[1])
    ce = masked_cross_entropy(logits, labels, valid if ce_mask is None else ce_mask)
    dice = soft_dice_loss(probs, target.to(probs.dtype), valid, squared=True,
                          include_background=True, smooth=1e-5)
    return {"ce": ce_weight * ce, "dice": dice_weight * dice}


class ReSegLoss(nn.Module):
    """Stage-2 loss ``L_seg + λ·L_align`` (paper Eq. 8); ``L_seg`` alone without a recon net.

    Returns ``{"loss", "ce", "dice"}`` plus ``"align"`` (= λ·L_align) when a recon net is given.
    """

    def __init__(self, config: ReSegUNetConfig, recon_net: ReSegUNet | None = None):
        super().__init__()
        if recon_net is not None and not isinstance(recon_net, ReSegUNet):
            raise TypeError("recon_net must be the ReSegUNet built by pretrain_stage(), "
                            f"got {type(recon_net).__name__}")
        self.config = config
        self.recon_net = recon_net
        if recon_net is not None:
            recon_net.requires_grad_(False)

    def forward(self, outputs: dict, targets: dict) -> dict:
        cfg = self.config
        terms = segmentation_terms(outputs["logits"], targets["labels"], targets_valid(targets),
                                   cfg.ce_weight, cfg.dice_weight, targets_pixel_mask(targets))
        if self.recon_net is not None:
            terms["align"] = cfg.align_weight * alignment_loss(
                outputs, self._recon_features(targets), cfg.mid)
        terms["loss"] = sum(terms.values())
        return terms

    def _recon_features(self, targets: dict) -> dict:
        """Frozen reconstruction-net features of the labels, without a graph."""
        self.recon_net.train(self.config.recon_bn == "train" and self.training)
        with torch.no_grad():
            return self.recon_net.features(make_recon_input(targets, self.config))
