"""PraNet-V2 losses (MODELS.md §3): per supervised output, multi-class 0.5·CE + 0.7·Dice + 0.3·BCE of
the background head against 1 − one_hot(y) (the authors' trainers), or for one class the code's
``structure_loss`` (weighted BCE + weighted IoU + 0.8·wBCE of the background head); deep or mutation
supervision. The model is in :mod:`.pranet_v2`.
"""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from . import losses

SUPERVISIONS = ("deep", "mutation")
BINARY_LOSSES = ("structure", "generic")


def background_target(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, H, W) int64 → (B, K, H, W) float: 1 where the pixel is NOT class c, class 0 included.

    For K = 1 (binary) this is 1 − G with G = (labels > 0).
    """
    if num_classes == 1:
        return (labels <= 0).float()[:, None]
    return 1.0 - losses.one_hot(labels, num_classes)


def boundary_weight(g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """w = (1 + 5·|AvgPool31(G·v) − G|)·v, (B, 1, H, W): emphasises pixels near object edges.

    Unsupervised pixels (v = 0) count as background in the local mean, like the zero padding at
    the image border, and get weight 0.
    """
    gv = g * v
    local = F.avg_pool2d(gv, kernel_size=31, stride=1, padding=15)
    return (1.0 + 5.0 * (local - gv).abs()) * v


def structure_terms(fg, bg, g, v, pixel_weight=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The code's binary ``structure_loss`` split into (wBCE, wIoU, wBCE on the background head).

    Args:
        fg, bg: (B, 1, H, W) logits; g: (B, 1, H, W) float {0, 1}; v: (B, 1, H, W) valid mask.
        pixel_weight: optional (B, 1, H, W) extra weights multiplying the boundary weights.

    Returns:
        Three scalars, each normalised per image and averaged over images with supervised pixels.
    """
    w = boundary_weight(g, v)
    if pixel_weight is not None:
        w = w * pixel_weight
    w_sum = w.sum(dim=(2, 3)).clamp_min(1.0)
    wbce = (w * F.binary_cross_entropy_with_logits(fg, g, reduction="none")).sum((2, 3)) / w_sum
    wbce_bg = (w * F.binary_cross_entropy_with_logits(bg, 1 - g, reduction="none")).sum((2, 3)) / w_sum
    p = torch.sigmoid(fg)
    inter = (p * g * w).sum(dim=(2, 3))
    union = ((p + g) * w).sum(dim=(2, 3))
    wiou = 1 - (inter + 1) / (union - inter + 1)
    n_images = (v.sum(dim=(1, 2, 3)) > 0).sum().clamp_min(1)
    return wbce.sum() / n_images, wiou.sum() / n_images, wbce_bg.sum() / n_images


class PraNetV2Loss(nn.Module):
    """PraNet-V2 loss over the supervised output sets (MODELS.md §3.5).

    Args:
        num_classes: K.
        supervision: "deep" (each stage output) or "mutation" (15 subsets, summed logits).
        binary_loss: for K = 1, "structure" (code) or "generic" (the multi-class form).
        ce_weight, dice_weight, background_weight: 0.5, 0.7, 0.3 (authors' trainers).
        binary_background_weight: 0.8 (the code's binary background wBCE weight).

    Call ``(outputs, targets)`` with the forward dict and targets {"labels", optional "valid"} →
    {"loss", and each weighted term summed over output sets}.
    """

    def __init__(self, num_classes: int, supervision: str = "deep", binary_loss: str = "structure",
                 ce_weight: float = 0.5, dice_weight: float = 0.7, background_weight: float = 0.3,
                 binary_background_weight: float = 0.8):
        super().__init__()
        if supervision not in SUPERVISIONS or binary_loss not in BINARY_LOSSES:
            raise ValueError(f"supervision must be one of {SUPERVISIONS} and binary_loss one of "
                             f"{BINARY_LOSSES}; got {supervision!r}, {binary_loss!r}")
        self.num_classes, self.supervision, self.binary_loss = num_classes, supervision, binary_loss
        self.ce_weight, self.dice_weight = ce_weight, dice_weight
        self.background_weight, self.binary_background_weight = background_weight, binary_background_weight

    def output_sets(self, outputs: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(fg, bg) logits per supervised set: the 4 stages, or the 15 summed non-empty subsets."""
        fg, bg = outputs["fg"], outputs["bg"]
        if self.supervision == "deep":
            return list(zip(fg, bg))
        subsets = [s for n in range(1, len(fg) + 1) for s in itertools.combinations(range(len(fg)), n)]
        return [(sum(fg[i] for i in s), sum(bg[i] for i in s)) for s in subsets]

    def forward(self, outputs: dict, targets: dict) -> dict[str, torch.Tensor]:
        labels, valid = targets["labels"], losses.targets_valid(targets)
        pixel_mask = losses.targets_pixel_mask(targets)
        sets = self.output_sets(outputs)
        if self.num_classes == 1 and self.binary_loss == "structure":
            terms = self._structure(sets, labels, valid, targets.get("pixel_weight"))
        else:
            terms = self._generic(sets, labels, valid, pixel_mask)
        return {"loss": sum(terms.values()), **terms}

    def _generic(self, sets, labels, valid, pixel_mask) -> dict[str, torch.Tensor]:
        """Σ_sets 0.5·CE + 0.7·Dice (squared, incl. background) + 0.3·BCE(bg, 1 − one_hot); the
        per-pixel CE and BCE are masked by ``pixel_mask`` (valid × pixel weights), Dice by ``valid``."""
        k = self.num_classes
        bg_target = background_target(labels, k)
        fg_target = 1.0 - bg_target
        ce_labels = (labels > 0).long() if k == 1 else labels
        ce = dice = bce = 0.0
        for fg, bg in sets:
            probs = torch.sigmoid(fg) if k == 1 else torch.softmax(fg, dim=1)
            ce = ce + losses.masked_cross_entropy(fg, ce_labels, pixel_mask)
            dice = dice + losses.soft_dice_loss(probs, fg_target, valid, squared=True,
                                                include_background=True, smooth=1e-5)
            bce = bce + losses.masked_bce(bg, bg_target, pixel_mask)
        return {"ce": self.ce_weight * ce, "dice": self.dice_weight * dice,
                "background_bce": self.background_weight * bce}

    def _structure(self, sets, labels, valid, pixel_weight) -> dict[str, torch.Tensor]:
        """Σ_sets wBCE + wIoU + 0.8·wBCE(bg, 1 − G) (binary, the authors' ``structure_loss``);
        optional ``pixel_weight (B, H, W)`` multiplies the boundary weights."""
        g = (labels > 0).float()[:, None]
        v = torch.ones_like(g) if valid is None else valid.to(g.dtype)[:, None]
        pw = None if pixel_weight is None else pixel_weight.to(g.dtype)[:, None]
        wbce, wiou, wbce_bg = (sum(t) for t in zip(*(structure_terms(f, b, g, v, pw) for f, b in sets)))
        return {"wbce": wbce, "wiou": wiou, "background_wbce": self.binary_background_weight * wbce_bg}
