"""Loss primitives shared by the five paper losses, all accepting a pixel mask.

Conventions: ``logits`` are ``(B, K, H, W)``; ``labels`` are ``(B, H, W) int64`` class indices;
``valid`` is ``None`` or a ``(B, H, W)`` float mask, 1 where a pixel is supervised and 0 where it is
not (fine-tuning on user edits masks unreviewed pixels out instead of calling them background);
a mask may also carry per-pixel weights > 1 (:func:`targets_pixel_mask`).
Every function returns a scalar tensor. With an all-zero mask the result is 0 with a gradient path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _mask_or_ones(valid: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """``valid`` (B, H, W) or ones shaped like ``like`` (B, ..., H, W) without its channel axis."""
    if valid is None:
        return torch.ones(like.shape[0], *like.shape[-2:], device=like.device, dtype=like.dtype)
    return valid.to(like.dtype)


def one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(B, H, W) int64`` → ``(B, K, H, W) float32`` one-hot."""
    return F.one_hot(labels.long(), num_classes).permute(0, 3, 1, 2).float()


def masked_cross_entropy(logits, labels, valid=None, weight=None) -> torch.Tensor:
    """Mean cross-entropy over supervised pixels (binary logits with K = 1 use BCE).

    Args:
        logits: ``(B, K, H, W)``.
        labels: ``(B, H, W) int64``.
        valid: optional ``(B, H, W)`` mask.
        weight: optional ``(K,)`` class weights (K > 1 only).
    """
    mask = _mask_or_ones(valid, logits)
    if logits.shape[1] == 1:
        per_pixel = F.binary_cross_entropy_with_logits(
            logits[:, 0], labels.float(), reduction="none")
    else:
        per_pixel = F.cross_entropy(logits, labels.long(), weight=weight, reduction="none")
    return (per_pixel * mask).sum() / mask.sum().clamp_min(1.0)


def masked_bce(logits, target, valid=None, pixel_weight=None) -> torch.Tensor:
    """Mean binary cross-entropy with logits over all channels of supervised pixels.

    Args:
        logits, target: ``(B, C, H, W)``; target in [0, 1].
        valid: optional ``(B, H, W)`` mask.
        pixel_weight: optional ``(B, 1 or C, H, W)`` extra weights (e.g. PraNet's boundary weights).
    """
    mask = _mask_or_ones(valid, logits)[:, None].expand_as(logits)
    if pixel_weight is not None:
        mask = mask * pixel_weight
    per_pixel = F.binary_cross_entropy_with_logits(logits, target.float(), reduction="none")
    return (per_pixel * mask).sum() / mask.sum().clamp_min(1.0)


def soft_dice_loss(probs, target_onehot, valid=None, squared=False, include_background=True,
                   smooth=1e-5, per_class=True) -> torch.Tensor:
    """1 − soft Dice, computed over the batch, averaged over classes.

    Args:
        probs: ``(B, K, H, W)`` probabilities.
        target_onehot: ``(B, K, H, W)`` one-hot target.
        valid: optional ``(B, H, W)`` mask.
        squared: TransUNet style (Σp² + Σy² in the denominator) instead of Σp + Σy.
        include_background: keep class 0 in the average.
        smooth: additive smoothing in numerator and denominator.
        per_class: average per-class Dice (True) or one Dice over all classes pooled (False).
    """
    mask = _mask_or_ones(valid, probs)[:, None]
    p, y = probs * mask, target_onehot * mask
    if not include_background and p.shape[1] > 1:
        p, y = p[:, 1:], y[:, 1:]
    dims = (0, 2, 3) if per_class else (0, 1, 2, 3)
    inter = (p * y).sum(dims)
    denom = ((p * p).sum(dims) + (y * y).sum(dims)) if squared else (p.sum(dims) + y.sum(dims))
    dice = (2 * inter + smooth) / (denom + smooth)
    return 1.0 - dice.mean()


def focal_tversky_loss(probs, target_onehot, valid=None, w_fn=0.7, w_fp=0.3, gamma_exponent=0.75,
                       smooth=1.0, include_background=False) -> torch.Tensor:
    """Focal Tversky loss (Abraham & Khan 2019), summed over the batch, mean over classes.

    ``TI_c = (TP + s) / (TP + w_fn·FN + w_fp·FP + s)``; loss = mean_c (1 − TI_c)^gamma_exponent.

    Args:
        probs, target_onehot: ``(B, K, H, W)``.
        valid: optional ``(B, H, W)`` mask.
    """
    mask = _mask_or_ones(valid, probs)[:, None]
    p, y = probs * mask, target_onehot * mask
    if not include_background and p.shape[1] > 1:
        p, y = p[:, 1:], y[:, 1:]
    dims = (0, 2, 3)
    tp = (p * y).sum(dims)
    fn = ((1 - p) * y).sum(dims)
    fp = (p * (1 - y) * mask).sum(dims)
    tversky = (tp + smooth) / (tp + w_fn * fn + w_fp * fp + smooth)
    return ((1 - tversky).clamp_min(1e-6) ** gamma_exponent).mean()


def targets_valid(targets: dict) -> torch.Tensor | None:
    """The optional ``"valid"`` mask of a targets dict."""
    return targets.get("valid")


def targets_pixel_mask(targets: dict) -> torch.Tensor | None:
    """The mask for per-pixel loss terms: ``"valid"`` times the optional ``"pixel_weight"``.

    ``targets["pixel_weight"]`` is a ``(B, H, W)`` float tensor of non-negative loss weights (e.g. the
    U-Net separation weights that stress pixels between touching nuclei); the per-pixel terms of
    every model's loss take the product as their mask, so the weighted mean stays a mean.
    """
    valid, weight = targets.get("valid"), targets.get("pixel_weight")
    if weight is None:
        return valid
    return weight if valid is None else valid * weight
