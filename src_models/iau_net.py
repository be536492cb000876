"""IAU-Net: Improved Attention U-Net (Liu, Yao, Mo & Zhang, "Attention U-net for Cell Instance
Segmentation").

Faithful to the paper (MODELS.md §4.1):

* a U-Net whose encoder and decoder are built from residual units;
* an attention gate in every decoder stage, Eq. 2: ``A(x, g) = (1 + σ(W_x x + W_g g + b)) ⊙ x``, where
  ``x`` is the decoder's (up-sampled) input feature map and ``g`` the encoder feature of that level;
* a deformable convolution (DCNv1, Eq. 3, offsets from an extra conv) as the last decoder layer;
* per-pixel class logits; the focal Tversky loss (Eq. 1, see below).

Unspecified in the paper, chosen as MODELS.md §4.3–4.6 argues:

* ResUNet (Zhang et al. 2018) pre-activation units (BN–ReLU–Conv3×3–BN–ReLU–Conv3×3 plus a
  Conv1×1+BN shortcut), down-sampling by the first conv's stride 2; 4 down-samplings with widths
  32-64-128-256-512 (8,304,122 parameters at 1 → 4 classes; MODELS.md: ≈8.3 M). Convs inside the
  units carry no bias: each feeds a BN or is summed with the shortcut's BN, whose shift is a bias.
* "lite" preset: widths 8-16-32-96-192 (1.08 M parameters). A CPU step is dominated by the two
  finest levels (full and half resolution), so they are the narrow ones; the coarse levels, which
  hold most parameters but cost little time, stay closer to a base-16 net.
* Bilinear ×2 up-sampling (keeps the channel count; no parameters).
* The gate in its literal linear form with one coefficient per pixel (W_x: Cx→1 without bias,
  W_g: Cg→1 with the bias b). ``gate="oktay"`` uses Oktay et al.'s additive gate
  ``σ(ψ(ReLU(BN(W_x x) + BN(W_g g))))`` with F_int = Cg/2, still applied as ``(1 + α) ⊙ x``;
  ``gate_target="skip"`` gates the encoder feature instead (Oktay's convention). α is returned
  (the paper's "importance mask", its Fig. 3).
* Last layer: DeformConv3×3 without bias (offset conv zero-initialised, learning rate ×0.1 through
  :meth:`IAUNet.param_groups`) → BN → ReLU → Conv1×1 head.
* Loss: Abraham & Khan's focal Tversky loss, whose text the paper reuses: w_FN 0.7, w_FP 0.3,
  exponent 0.75, smooth 1, foreground classes, sums over the batch. ``ftl_literal=True`` uses Eq. 1
  as printed (a (1 − α) prefactor and no exponent). ``ce_weight`` adds masked cross-entropy (not in
  the paper; default 0).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import losses
from .base import MapSpec, ModelConfig, SegmentationModel
from .deform_conv import DeformConv2d
from .registry import register

DEPTH = 4  # down-samplings; size_multiple = 2 ** DEPTH


@dataclass(frozen=True)
class IAUNetConfig(ModelConfig):
    """IAU-Net configuration (fields beyond in/out channels are unspecified in the paper)."""

    # Encoder widths e1..e4 and the bridge (4 down-samplings); MODELS.md §4.3: base 32 doubling.
    widths: tuple[int, ...] = (32, 64, 128, 256, 512)
    gate: str = "paper"  # "paper" = literal Eq. 2 (1×1 convs to one channel) | "oktay" (F_int = Cg/2)
    gate_target: str = "input"  # "input" = gate the up-sampled decoder map (Eq. 2) | "skip" (Oktay)
    upsample: str = "bilinear"  # "bilinear" (align_corners=False) | "transpose" (ConvT k2 s2, same width)
    downsample: str = "stride"  # "stride" = stride-2 first conv (ResUNet) | "maxpool" + stride-1 unit
    ftl_w_fn: float = 0.7  # Tversky weight on false negatives (Abraham & Khan)
    ftl_w_fp: float = 0.3  # Tversky weight on false positives (the paper's α)
    ftl_exponent: float = 0.75  # focal exponent 1/γ, γ = 4/3 (Abraham & Khan)
    ftl_smooth: float = 1.0  # ε in Eq. 1 (Keras code: 1)
    ftl_include_background: bool = False  # Abraham & Khan score the foreground only
    ftl_literal: bool = False  # Eq. 1 as printed: w_FN·(1 − TI), no exponent
    ce_weight: float = 0.0  # extra masked cross-entropy; 0 = the paper's loss alone


class ResidualUnit(nn.Module):
    """ResUNet pre-activation residual unit: (B, C_in, H, W) → (B, C_out, H/stride, W/stride).

    ``body = BN–ReLU–Conv3×3(stride)–BN–ReLU–Conv3×3``; the stem (``preactivate=False``) starts
    with the conv because its input is the raw image. ``shortcut = Conv1×1(stride)+BN``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, preactivate: bool = True):
        super().__init__()
        pre = [nn.BatchNorm2d(in_channels), nn.ReLU(inplace=True)] if preactivate else []
        self.body = nn.Sequential(
            *pre,
            nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
        )
        self.stride = stride
        self.shortcut = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Subsampling then a 1×1 conv is exactly a stride-2 1×1 conv, without computing discarded
        # outputs; it also avoids a oneDNN crash (torch 2.13 CPU, channels_last, 1×1 stride-2
        # backward with few channels).
        skip = x[..., ::self.stride, ::self.stride] if self.stride > 1 else x
        return self.body(x) + self.shortcut(skip)


class AttentionGate(nn.Module):
    """Eq. 2 coefficients α = σ(W_x x + W_g g + b), one per pixel: → (B, 1, H, W) in (0, 1).

    Args:
        x_channels: channels of the decoder map ``x`` (B, Cx, H, W).
        g_channels: channels of the encoder map ``g`` (B, Cg, H, W).
        kind: ``"paper"`` (linear, as printed) or ``"oktay"`` (additive with a hidden layer).
    """

    def __init__(self, x_channels: int, g_channels: int, kind: str = "paper"):
        super().__init__()
        if kind == "paper":
            self.w_x = nn.Conv2d(x_channels, 1, 1, bias=False)
            self.w_g = nn.Conv2d(g_channels, 1, 1, bias=True)  # carries b
            self.psi = nn.Identity()
        elif kind == "oktay":
            inter = max(1, g_channels // 2)
            self.w_x = nn.Sequential(nn.Conv2d(x_channels, inter, 1, bias=False), nn.BatchNorm2d(inter))
            self.w_g = nn.Sequential(nn.Conv2d(g_channels, inter, 1, bias=False), nn.BatchNorm2d(inter))
            self.psi = nn.Sequential(nn.ReLU(inplace=True), nn.Conv2d(inter, 1, 1, bias=True))
        else:
            raise ValueError(f"gate must be 'paper' or 'oktay', got {kind!r}")

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.psi(self.w_x(x) + self.w_g(g)))


class DecoderStage(nn.Module):
    """Up×2 → attention gate → ResidualUnit(cat[gated, skip]).

    ``low (B, C_low, h, w)``, ``skip (B, C_skip, 2h, 2w)`` → ``(B, C_out, 2h, 2w)``, α ``(B, 1, 2h, 2w)``.
    """

    def __init__(self, low_channels: int, skip_channels: int, out_channels: int, cfg: IAUNetConfig):
        super().__init__()
        if cfg.upsample == "bilinear":
            self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        elif cfg.upsample == "transpose":
            self.up = nn.ConvTranspose2d(low_channels, low_channels, 2, stride=2)
        else:
            raise ValueError(f"upsample must be 'bilinear' or 'transpose', got {cfg.upsample!r}")
        if cfg.gate_target not in ("input", "skip"):
            raise ValueError(f"gate_target must be 'input' or 'skip', got {cfg.gate_target!r}")
        self.gate_skip = cfg.gate_target == "skip"
        self.gate = AttentionGate(low_channels, skip_channels, cfg.gate)
        self.unit = ResidualUnit(low_channels + skip_channels, out_channels)

    def forward(self, low: torch.Tensor, skip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.up(low)
        alpha = self.gate(x, skip)
        # Residual gating (1 + α): features are emphasised, never suppressed below their input.
        if self.gate_skip:
            merged = torch.cat([x, (1 + alpha) * skip], dim=1)
        else:
            merged = torch.cat([(1 + alpha) * x, skip], dim=1)
        return self.unit(merged), alpha


@register
class IAUNet(SegmentationModel):
    """Residual attention U-Net with a deformable last layer.

    ``forward``: ``x (B, C_in, H, W) float32``, H and W multiples of 16 →
    ``{"logits": (B, K, H, W), "attn": [α4, α3, α2, α1] each (B, 1, H/2^(k−1), W/2^(k−1)),
    "offsets": (B, 18, H, W)}`` (same keys in training and eval mode; α1 is the finest gate).
    """

    name = "iau_net"
    paper = "Liu et al., Attention U-net for Cell Instance Segmentation (IAU-Net)"
    description = "Residual U-Net with attention gates and a deformable last layer (focal Tversky loss)"
    config_class = IAUNetConfig
    presets = {
        "paper": {"in_channels": 3, "num_classes": 3, "widths": (32, 64, 128, 256, 512)},
        "lite": {"in_channels": 3, "num_classes": 3, "widths": (8, 16, 32, 96, 192)},
    }
    aux_kinds = ("attention",)
    translation_equivariant = True
    size_multiple = 2 ** DEPTH
    # Tiled inference core edge: deformable convolution unfolds k² sampled copies of its input, so a
    # lite forward pass at 1216² (1024 core + halo) peaks at ~1 GB on the CPU and a 16k² run at
    # 2.19 GB; at 704² (512 core) it peaks at ~0.4 GB.
    default_crop_tile = 512

    def __init__(self, config: IAUNetConfig):
        super().__init__(config)
        if config.downsample not in ("stride", "maxpool"):
            raise ValueError(f"downsample must be 'stride' or 'maxpool', got {config.downsample!r}")
        widths = list(config.widths)
        if len(widths) != DEPTH + 1:
            raise ValueError(f"widths must list {DEPTH + 1} channel counts (e1..e4, bridge), got {widths}")
        self.stem = ResidualUnit(config.in_channels, widths[0], preactivate=False)
        self.down = nn.ModuleList(self._down_stage(c_in, c_out, config.downsample)
                                  for c_in, c_out in zip(widths[:-1], widths[1:]))
        # Decoder from the bottom: stage for level k takes widths[k+1] up and skip widths[k].
        self.up = nn.ModuleList(DecoderStage(widths[k + 1], widths[k], widths[k], config)
                                for k in reversed(range(DEPTH)))
        self.deform = DeformConv2d(widths[0], widths[0], 3, bias=False)
        self.deform_post = nn.Sequential(nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        self.head = nn.Conv2d(widths[0], config.num_classes, 1)

    @staticmethod
    def _down_stage(c_in: int, c_out: int, mode: str) -> nn.Module:
        if mode == "stride":
            return ResidualUnit(c_in, c_out, stride=2)
        return nn.Sequential(nn.MaxPool2d(2), ResidualUnit(c_in, c_out))

    def forward(self, x: torch.Tensor) -> dict:
        """See the class docstring; x must have H, W divisible by 16."""
        self.check_input(x)
        skips = [self.stem(x)]
        for stage in self.down:
            skips.append(stage(skips[-1]))
        y = skips.pop()  # the bridge, (B, 16·base, H/16, W/16)
        attn = []
        for stage in self.up:  # coarse → fine: α4, α3, α2, α1
            y, alpha = stage(y, skips.pop())
            attn.append(alpha)
        y, offsets = self.deform(y)
        logits = self.head(self.deform_post(y))
        return {"logits": logits, "attn": attn, "offsets": offsets}

    # ----------------------------------------------------------------- maps for the viewer
    def map_specs(self, mc_samples: int = 0) -> list[MapSpec]:
        specs = super().map_specs(mc_samples)
        for k in range(1, DEPTH + 1):
            specs.append(MapSpec(
                f"attention_gate{k}", 1, "attention", (0.0, 1.0),
                f"attention coefficients of decoder gate {k} (1 = finest, {DEPTH} = coarsest), "
                "resized to the image"))
        return specs

    def _predict_padded(self, x: torch.Tensor, mc_samples: int) -> dict[str, torch.Tensor]:
        out = self(x)
        maps = {"probs": self.class_probabilities(out["logits"])}
        # attn is coarse → fine, so gate k (1 = finest) is attn[DEPTH − k].
        for k in range(1, DEPTH + 1):
            alpha = out["attn"][DEPTH - k]
            # Bilinear weights are convex, so the resized map stays in (0, 1).
            maps[f"attention_gate{k}"] = F.interpolate(alpha, size=x.shape[-2:], mode="bilinear",
                                                       align_corners=False)
        return maps

    # ----------------------------------------------------------------- training helpers
    def param_groups(self, lr: float) -> list[dict]:
        """Optimizer groups: everything at ``lr``, the deformable offset predictor at
        ``lr · DeformConv2d.offset_lr_scale`` (0.1, standard DCN practice; MODELS.md §4.6)."""
        offset_params = list(self.deform.offset_conv.parameters())
        offset_ids = {id(p) for p in offset_params}
        rest = [p for p in self.parameters() if id(p) not in offset_ids]
        return [{"params": rest, "lr": lr},
                {"params": offset_params, "lr": lr * self.deform.offset_lr_scale}]

    def make_loss(self, **kwargs) -> nn.Module:
        """Focal Tversky loss (+ optional CE); ``kwargs`` override the config's ``ftl_*``/``ce_weight``."""
        fields = {k: getattr(self.config, k) for k in
                  ("ftl_w_fn", "ftl_w_fp", "ftl_exponent", "ftl_smooth", "ftl_include_background",
                   "ftl_literal", "ce_weight")}
        unknown = set(kwargs) - set(fields)
        if unknown:
            raise ValueError(f"unknown loss option(s) {sorted(unknown)}; known: {sorted(fields)}")
        fields.update(kwargs)
        return IAUNetLoss(**{k.removeprefix("ftl_"): v for k, v in fields.items()})


class IAUNetLoss(nn.Module):
    """Focal Tversky loss over the foreground classes (+ optional masked CE).

    ``loss(outputs, targets)``: ``outputs["logits"] (B, K, H, W)``; ``targets["labels"] (B, H, W)
    int64``, optional ``targets["valid"] (B, H, W)``. Returns ``{"loss", "focal_tversky"[,
    "cross_entropy"]}``, each term already weighted. Probabilities are softmax (sigmoid for K = 1).
    """

    def __init__(self, w_fn=0.7, w_fp=0.3, exponent=0.75, smooth=1.0, include_background=False,
                 literal=False, ce_weight=0.0):
        super().__init__()
        self.w_fn, self.w_fp, self.exponent, self.smooth = w_fn, w_fp, exponent, smooth
        self.include_background, self.literal, self.ce_weight = include_background, literal, ce_weight

    def forward(self, outputs: dict, targets: dict) -> dict:
        logits, labels = outputs["logits"], targets["labels"]
        valid = losses.targets_pixel_mask(targets)   # pixel weights weight TP/FN/FP and CE alike
        if logits.shape[1] == 1:
            probs, onehot = torch.sigmoid(logits), labels[:, None].float()
        else:
            probs, onehot = torch.softmax(logits, dim=1), losses.one_hot(labels, logits.shape[1])
        # Eq. 1 as printed: (1 − α)(1 − TI) with α on FP, i.e. the FN weight times 1 − TI.
        exponent, scale = (1.0, self.w_fn) if self.literal else (self.exponent, 1.0)
        if valid is not None and not bool(valid.any()):
            # Nothing supervised: TI = 1 exactly, where (1 − TI)^0.75 has an infinite slope and
            # autograd would give NaN gradients; the loss is 0 with a zero gradient instead.
            ftl = logits.sum() * 0.0
        else:
            ftl = scale * losses.focal_tversky_loss(
                probs, onehot, valid, w_fn=self.w_fn, w_fp=self.w_fp, gamma_exponent=exponent,
                smooth=self.smooth, include_background=self.include_background)
        terms = {"focal_tversky": ftl}
        if self.ce_weight > 0:
            terms["cross_entropy"] = self.ce_weight * losses.masked_cross_entropy(logits, labels, valid)
        return {"loss": sum(terms.values()), **terms}
