"""Deformable convolution v1 (Dai et al. 2017), as used in IAU-Net's last decoder layer (its Eq. 3).

``y(p0) = Σ_n w(p_n) · x(p0 + p_n + Δp_n)`` where ``p_n`` runs over the k×k kernel grid and the
offsets ``Δp_n`` are predicted from the input by an extra k×k convolution. DCNv1 has no modulation
mask (DCNv2 adds one); Eq. 3 of the paper has none either.

Two implementations, same numerics:

* ``torchvision.ops.deform_conv2d`` when torchvision imports. It is optional: torchvision cannot be
  installed beside the CPU-only torch build these machines use (the import fails, sometimes with a
  ``RuntimeError`` from mismatched compiled operators rather than an ``ImportError``), so it is
  never required.
* :func:`deform_conv2d_torch`, pure PyTorch: the k·k shifted sampling grids are read with
  ``grid_sample`` (bilinear, zeros outside the image; pixel coordinates mapped for
  ``align_corners=False`` so sizes of 1 work too), then contracted with the weights in one batched
  matmul (the sampled tensor is already laid out as (B, C_in·k·k, H·W), so nothing is permuted).
  On a CPU a forward + backward costs about 8 plain 3×3 convolutions of the same width
  (``grid_sample`` and its backward dominate), which is why IAU-Net keeps it to its last layer.
  This is torchvision's definition: a sample at (h, w) is the bilinear mix of its four
  integer neighbours, neighbours outside the image counting as 0. Gradients reach the input, the
  weights and the offsets.

Offsets follow torchvision's layout: ``(B, 2·k·k, H, W)``; channel ``2·n`` is Δy and ``2·n + 1`` is
Δx of kernel point ``n = i·k + j`` (row-major over the kernel), one offset group.
"""
from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

try:  # optional fast path; see the module docstring for why both errors are caught
    from torchvision.ops import deform_conv2d as _tv_deform_conv2d
except (ImportError, RuntimeError, OSError):
    _tv_deform_conv2d = None

HAS_TORCHVISION = _tv_deform_conv2d is not None


def deform_conv2d_torch(x: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """Pure-PyTorch DCNv1, stride 1, "same" padding k // 2, dilation 1, one offset group.

    Args:
        x: ``(B, C_in, H, W)`` float input.
        offset: ``(B, 2·k·k, H, W)`` float offsets in pixels, torchvision layout (Δy, Δx per point).
        weight: ``(C_out, C_in, k, k)`` kernel, k odd.
        bias: optional ``(C_out,)``.

    Returns:
        ``(B, C_out, H, W)``, equal to ``torchvision.ops.deform_conv2d(x, offset, weight, bias,
        padding=k // 2)`` up to float rounding.
    """
    b, c_in, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    n_points = kh * kw
    if offset.shape != (b, 2 * n_points, h, w):
        raise ValueError(f"offset must have shape {(b, 2 * n_points, h, w)}, got {tuple(offset.shape)}")
    dtype, device = x.dtype, x.device
    # Base sampling positions p0 + p_n in pixels: (n_points, H, W) each.
    ky, kx = torch.meshgrid(torch.arange(kh, device=device, dtype=dtype) - kh // 2,
                            torch.arange(kw, device=device, dtype=dtype) - kw // 2, indexing="ij")
    py, px = torch.meshgrid(torch.arange(h, device=device, dtype=dtype),
                            torch.arange(w, device=device, dtype=dtype), indexing="ij")
    base_y = ky.reshape(-1, 1, 1) + py
    base_x = kx.reshape(-1, 1, 1) + px
    off = offset.view(b, n_points, 2, h, w)
    sample_y = base_y + off[:, :, 0]  # (B, n_points, H, W)
    sample_x = base_x + off[:, :, 1]
    # Pixel coordinate → grid_sample's [-1, 1] for align_corners=False: (2·p + 1) / size − 1.
    grid = torch.stack(((2 * sample_x + 1) / w - 1, (2 * sample_y + 1) / h - 1), dim=-1)
    grid = grid.view(b, n_points * h, w, 2)
    sampled = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    # (B, C_in, n·H, W) is already laid out as (B, C_in·n, H·W): one matmul, no permuting copy.
    out = torch.bmm(weight.reshape(1, c_out, c_in * n_points).expand(b, -1, -1),
                    sampled.view(b, c_in * n_points, h * w))
    if bias is not None:
        out = out + bias.view(1, -1, 1)
    return out.view(b, c_out, h, w)


def deform_conv2d(x: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor,
                  bias: torch.Tensor | None = None, use_torchvision: bool | None = None) -> torch.Tensor:
    """DCNv1 with "same" padding: torchvision when available (or asked for), else the fallback.

    Args:
        x, offset, weight, bias: as in :func:`deform_conv2d_torch`.
        use_torchvision: ``None`` = whenever it imports; ``False`` forces the pure-PyTorch path.
    """
    if use_torchvision is None:
        use_torchvision = HAS_TORCHVISION
    if use_torchvision:
        if not HAS_TORCHVISION:
            raise RuntimeError("torchvision is not importable here; call with use_torchvision=False")
        pad = (weight.shape[-2] // 2, weight.shape[-1] // 2)
        return _tv_deform_conv2d(x, offset, weight, bias, padding=pad)
    return deform_conv2d_torch(x, offset, weight, bias)


class DeformConv2d(nn.Module):
    """Deformable k×k convolution with its own offset predictor, stride 1, "same" padding.

    ``offsets = offset_conv(x)`` (a plain k×k conv, weights and bias zero-initialised so the layer
    starts as an ordinary convolution, standard DCN practice) → ``y = deform_conv2d(x, offsets, W, b)``.

    Shapes: ``x (B, C_in, H, W) float32`` → ``(y (B, C_out, H, W), offsets (B, 2·k·k, H, W))``.

    Attributes:
        offset_lr_scale: learning-rate multiplier DCN practice applies to ``offset_conv``
            (Dai et al. 2017 use 0.1 for the offset layer). :meth:`param_groups` applies it.
        use_torchvision: ``None`` (use torchvision's kernel when it imports) or ``False``.
    """

    offset_lr_scale: ClassVar[float] = 0.1

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, bias: bool = True,
                 use_torchvision: bool | None = None):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd for 'same' padding, got {kernel_size}")
        self.kernel_size = kernel_size
        self.use_torchvision = use_torchvision
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.offset_conv = nn.Conv2d(in_channels, 2 * kernel_size * kernel_size, kernel_size,
                                     padding=kernel_size // 2)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Conv2d's default init for the kernel (as torchvision's DeformConv2d); zero offsets."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight[0].numel()
            nn.init.uniform_(self.bias, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
        nn.init.zeros_(self.offset_conv.weight)
        nn.init.zeros_(self.offset_conv.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, C_in, H, W)`` → ``(B, C_out, H, W)`` output and ``(B, 2·k·k, H, W)`` offsets."""
        offsets = self.offset_conv(x)
        return deform_conv2d(x, offsets, self.weight, self.bias, self.use_torchvision), offsets

    def param_groups(self, lr: float) -> list[dict]:
        """Optimizer groups: the kernel at ``lr``, the offset predictor at ``lr · offset_lr_scale``."""
        offset_ids = {id(p) for p in self.offset_conv.parameters()}
        main = [p for p in self.parameters() if id(p) not in offset_ids]
        return [{"params": main, "lr": lr},
                {"params": list(self.offset_conv.parameters()), "lr": lr * self.offset_lr_scale}]
