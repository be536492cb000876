"""V-UNet: a U-Net whose four skip connections are replaced by variational attention (VAEM).

Paper: Zhang, Yang, Li, Zhang, Ren, Li & Xu, "V-UNet: Medical Image Segmentation Based on Variational
Attention Mechanism", CAAI Transactions on Intelligence Technology, 2025. No official code exists;
this follows MODELS.md §1.

Faithful to the paper:
    * U-Net encoder / bottleneck / decoder; every skip f^k passes through a VAEM (Sec. 3.1, Fig. 3):
      f^k and the decoder feature f̂^{k+1} each go through conv + BN + ReLU, f̂^{k+1} is resized to
      f^k and added; multi-scale pooling 3×3, 6×6, 9×9; flatten + concat; two fully connected
      branches give μ and log σ²; σ = exp(0.5·log σ²) (Eq. 1); z = μ + ε·σ (Eq. 2); the resized z
      gives an attention map.
    * Loss L = 0.74·L_smask + 0.15·L_recon + 0.11·L_KL (Eqs. 3–5, 10–12), prior N(0, I).

Choices the paper leaves open (MODELS.md §1.2–1.8), all fields of ``VUNetConfig``:
    * Widths 16-32-64-128-256, milesial-style DoubleConv, ConvTranspose up-sampling, 1×1 projections to
      C_k channels and a latent of 81 = 9×9 per level: this reproduces the reported 6.91 M parameters
      exactly (6,908,057 at 1 input channel, 1 class; the U-Net-16 baseline gives the reported 1.94 M).
    * Encoder block 3×3+3×3 (the parameter counts need it) although the text describes 3×3 then 1×1;
      ``enc_block="3x3+1x1"`` gives the textual reading.
    * Adaptive *average* pooling; one-channel sigmoid attention multiplied onto the skip (as in
      Attention U-Net); log σ² clamped to [−10, 10] for numerical safety (ours).
    * L_recon = MSE(ConvT_k(f̂^{k+1}), f^k): the decoder's own up-sampler is the only parameter-free,
      shape-exact reading of Eq. 11. L_KL sums over the 81 latent dims, averages over batch and levels,
      with the minus sign Eq. 12 lost. Multi-class (K > 1) uses cross-entropy in place of BCE.
    * Evaluation uses z = μ (deterministic) unless ``sample_at_eval``; ``predict(x, mc_samples=T)`` runs
      the encoder once and the VAEMs + decoder T times with sampled ε (BN in eval mode) and returns
      mean probabilities, variance, predictive entropy and mutual information.

The "lite" preset narrows the widths to 12-24-48-96-192 and the latent to 6×6 for CPU training.

The latents come from pooling over the whole tile, so the network is not translation-equivariant: tile
at the training size and blend.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import MapSpec, ModelConfig, SegmentationModel
from .blocks import DoubleConv
from .losses import masked_cross_entropy, targets_pixel_mask
from .registry import register

ENC_BLOCKS = {"3x3+3x3": 3, "3x3+1x1": 1}  # second kernel size of the encoder DoubleConv
ATTN_MODES = ("multiply", "residual")


@dataclass(frozen=True)
class VUNetConfig(ModelConfig):
    """V-UNet configuration (frozen).

    Attributes:
        base_width: channels of the first level; level k has base_width·2^(k-1), the bottleneck 16×.
            Paper: 16 (derived from the 6.91 M / 1.94 M parameter counts).
        enc_block: "3x3+3x3" (matches the reported counts) or "3x3+1x1" (the paper's text; −0.70 M).
        use_vaem: False gives the plain U-Net baseline (skips passed through unchanged).
        pool_sizes: adaptive average pooling grid sizes of the multi-scale pooling (paper: 3, 6, 9).
        latent_side: the latent z of each level has latent_side² elements, reshaped to a square
            before up-sampling (9 → 81, reproduces the parameter count; not stated in the paper).
        logvar_clamp: log σ² is clamped to [−logvar_clamp, logvar_clamp] (ours, for stability).
        attn_mode: "multiply" (skip ⊙ α, default) or "residual" (skip ⊙ (1 + α)).
        sample_at_eval: sample z in eval-mode forward instead of using z = μ (the literal
            reparameterised forward; default False for reproducible metrics).
    """

    base_width: int = 16
    enc_block: str = "3x3+3x3"
    use_vaem: bool = True
    pool_sizes: tuple[int, ...] = (3, 6, 9)
    latent_side: int = 9
    logvar_clamp: float = 10.0
    attn_mode: str = "multiply"
    sample_at_eval: bool = False

    def __post_init__(self):
        if self.enc_block not in ENC_BLOCKS:
            raise ValueError(f"enc_block must be one of {list(ENC_BLOCKS)}, got {self.enc_block!r}")
        if self.attn_mode not in ATTN_MODES:
            raise ValueError(f"attn_mode must be one of {list(ATTN_MODES)}, got {self.attn_mode!r}")
        if self.base_width < 1 or self.latent_side < 1 or not self.pool_sizes:
            raise ValueError("base_width and latent_side must be ≥ 1 and pool_sizes non-empty")


def _projection(c_in: int, c_out: int) -> nn.Sequential:
    """1×1 conv (no bias) → BN → ReLU: ``(B, c_in, H, W)`` → ``(B, c_out, H, W)``."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True))


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    """Bilinear resize of ``(B, C, h, w)`` to ``(B, C, *size)`` (align_corners=False)."""
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class VariationalAttention(nn.Module):
    """VAEM_k (MODELS.md §1.4): gate the skip f^k with an attention map drawn from a Gaussian latent.

    Args:
        channels: C = channels of f^k; the decoder feature f̂^{k+1} has 2C.
        pool_sizes: adaptive average pooling grids (3, 6, 9 → 126·C pooled values).
        latent_side: z has latent_side² elements.
        logvar_clamp: bound on |log σ²|.
        attn_mode: "multiply" or "residual".
    """

    def __init__(self, channels: int, pool_sizes=(3, 6, 9), latent_side: int = 9,
                 logvar_clamp: float = 10.0, attn_mode: str = "multiply"):
        super().__init__()
        self.proj_skip = _projection(channels, channels)  # W_x
        self.proj_dec = _projection(2 * channels, channels)  # W_g
        self.pools = nn.ModuleList(nn.AdaptiveAvgPool2d(s) for s in pool_sizes)
        pooled = channels * sum(s * s for s in pool_sizes)
        self.latent_side = latent_side
        self.fc_mu = nn.Linear(pooled, latent_side ** 2)
        self.fc_logvar = nn.Linear(pooled, latent_side ** 2)
        self.logvar_clamp = logvar_clamp
        self.attn_mode = attn_mode

    def forward(self, skip: torch.Tensor, dec: torch.Tensor, sample: bool):
        """Gate ``skip`` by variational attention.

        Args:
            skip: f^k, ``(B, C, H, W)``.
            dec: f̂^{k+1}, ``(B, 2C, H/2, W/2)``.
            sample: draw z = μ + ε·σ (True) or use z = μ.

        Returns:
            ``(gated (B, C, H, W), mu (B, d), logvar (B, d), alpha (B, 1, H, W))``, d = latent_side².
        """
        size = skip.shape[-2:]
        fused = self.proj_skip(skip) + _resize(self.proj_dec(dec), size)
        pooled = torch.cat([pool(fused).flatten(1) for pool in self.pools], dim=1)  # (B, 126·C)
        mu = self.fc_mu(pooled)
        logvar = self.fc_logvar(pooled).clamp(-self.logvar_clamp, self.logvar_clamp)
        z = (mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)) if sample else mu  # Eq. 2
        side = self.latent_side
        alpha = torch.sigmoid(_resize(z.view(-1, 1, side, side), size))
        gate = 1.0 + alpha if self.attn_mode == "residual" else alpha
        return skip * gate, mu, logvar, alpha


def _entropy(probs: torch.Tensor) -> torch.Tensor:
    """Per-pixel entropy (nats) of probabilities ``(B, K, H, W)`` → ``(B, 1, H, W)``.

    K = 1 holds the foreground probability of a sigmoid output (binary entropy).
    """
    if probs.shape[1] == 1:
        return -(torch.special.xlogy(probs, probs) + torch.special.xlogy(1 - probs, 1 - probs))
    return -torch.special.xlogy(probs, probs).sum(dim=1, keepdim=True)


@register
class VUNet(SegmentationModel):
    """V-UNet: U-Net with variational attention (VAEM) on every skip; input ``(B, C_in, H, W)``."""

    name = "vunet"
    paper = ("Zhang et al., V-UNet: Medical Image Segmentation Based on Variational Attention "
             "Mechanism, CAAI Trans. Intell. Technol. 2025")
    description = ("U-Net with variational attention on its skips; sampling its latents gives "
                   "uncertainty maps")
    config_class = VUNetConfig
    presets = {
        "paper": {"in_channels": 3, "num_classes": 3, "base_width": 16, "latent_side": 9},
        # Same topology, narrower: the FC heads (2·126·C_k·d per level) dominate the count, so both
        # the widths (12-24-48-96-192) and the unstated latent (6×6 = 36) shrink: 2.76 M parameters,
        # a training step costs ~0.8× a plain U-Net-16 (base 16 + latent 25 would cost 1.3×).
        "lite": {"in_channels": 3, "num_classes": 3, "base_width": 12, "latent_side": 6},
    }
    aux_kinds = ("uncertainty",)
    translation_equivariant = False
    size_multiple = 16

    def __init__(self, config: VUNetConfig):
        super().__init__(config)
        widths = [config.base_width * 2 ** i for i in range(5)]  # paper: 16 … 256
        k2 = ENC_BLOCKS[config.enc_block]
        # encoder[0] = inc, encoder[1..4] = max-pool + DoubleConv; encoder[4] is the bottleneck.
        self.encoder = nn.ModuleList([DoubleConv(config.in_channels, widths[0], second_kernel=k2)])
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            down = DoubleConv(c_in, c_out, second_kernel=k2)
            self.encoder.append(nn.Sequential(nn.MaxPool2d(2), down))
        # Decoder modules indexed by skip level k = 1..4 (index 0 = finest).
        self.ups = nn.ModuleList(nn.ConvTranspose2d(2 * c, c, 2, stride=2) for c in widths[:4])
        self.dec_convs = nn.ModuleList(DoubleConv(2 * c, c) for c in widths[:4])
        self.vaems = nn.ModuleList(
            VariationalAttention(c, config.pool_sizes, config.latent_side, config.logvar_clamp,
                                 config.attn_mode) for c in widths[:4]
        ) if config.use_vaem else None
        self.head = nn.Conv2d(widths[0], config.num_classes, 1)

    # ----------------------------------------------------------------- network
    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Encoder features ``[f¹, f², f³, f⁴, f̂⁵]``; f^k is ``(B, C_k, H/2^(k-1), W/2^(k-1))``."""
        feats = []
        for block in self.encoder:
            x = block(x)
            feats.append(x)
        return feats

    def decode(self, feats: list[torch.Tensor], sample: bool) -> dict:
        """Run the VAEMs and the decoder on cached encoder features.

        Args:
            feats: output of ``encode``.
            sample: draw z with ε ~ N(0, I) (True) or use z = μ.

        Returns:
            The training dict: ``logits (B, K, H, W)``; lists ordered by level k = 1..4 (finest first):
            ``mu``/``logvar`` ``(B, d)`` each (empty without VAEM), ``recon_pairs``
            ``[(ConvT_k(f̂^{k+1}), f^k)]``, ``attn`` ``(B, 1, H_k, W_k)``, ``dec_feats`` f̂^k.
        """
        n = len(self.ups)
        mu, logvar, attn, recon, dec_feats = [None] * n, [None] * n, [None] * n, [None] * n, [None] * n
        dec = feats[-1]
        for k in reversed(range(n)):
            skip = feats[k]
            if self.vaems is not None:
                skip, mu[k], logvar[k], attn[k] = self.vaems[k](skip, dec, sample)
            up = self.ups[k](dec)
            recon[k] = (up, feats[k])
            dec = self.dec_convs[k](torch.cat([skip, up], dim=1))  # milesial order: [skip, up]
            dec_feats[k] = dec
        has_vaem = self.vaems is not None
        return {
            "logits": self.head(dec),
            "mu": mu if has_vaem else [],
            "logvar": logvar if has_vaem else [],
            "recon_pairs": recon,
            "attn": attn if has_vaem else [],
            "dec_feats": dec_feats,
        }

    def forward(self, x: torch.Tensor) -> dict:
        """``x (B, C_in, H, W) float32``, H and W multiples of 16.

        Returns:
            Training mode: the dict of ``decode`` (z sampled). Eval mode (z = μ unless
            ``sample_at_eval``): ``logits (B, K, H, W)``, ``mu``/``logvar`` ``(B, 4, d)`` and ``attn``
            ``(B, 4, H, W)`` (the four attention maps resized to the input); the last three only
            with VAEM.
        """
        self.check_input(x)
        out = self.decode(self.encode(x), sample=self.training or self.config.sample_at_eval)
        if self.training:
            return out
        result = {"logits": out["logits"]}
        if out["mu"]:
            size = x.shape[-2:]
            result["mu"] = torch.stack(out["mu"], dim=1)
            result["logvar"] = torch.stack(out["logvar"], dim=1)
            result["attn"] = torch.cat([_resize(a, size) for a in out["attn"]], dim=1)
        return result

    # ----------------------------------------------------------------- prediction
    def map_specs(self, mc_samples: int = 0) -> list[MapSpec]:
        """``probs``, ``entropy``; with ``mc_samples > 0`` also ``variance``, ``mutual_information``."""
        k = self.config.num_classes
        max_entropy = math.log(max(k, 2))  # ln 2 for binary (K = 1)
        specs = super().map_specs(mc_samples)
        specs.append(MapSpec("entropy", 1, "uncertainty", (0.0, max_entropy),
                             "predictive entropy of the class probabilities (nats)"))
        if mc_samples > 0:
            specs.append(MapSpec("variance", 1, "uncertainty", (0.0, 0.25),
                                 "variance of the class probabilities over latent samples "
                                 "(summed over classes)"))
            specs.append(MapSpec("mutual_information", 1, "uncertainty", (0.0, max_entropy),
                                 "mutual information between prediction and latents (epistemic part)"))
        return specs

    def _predict_padded(self, x: torch.Tensor, mc_samples: int) -> dict[str, torch.Tensor]:
        """Probabilities and uncertainty maps for a padded ``x`` (model already in eval mode).

        With ``mc_samples = T > 0`` the encoder runs once and the VAEMs + decoder T times with sampled
        ε, one pass at a time so that a 512×512 tile with T = 20 needs the memory of a single pass.
        """
        if mc_samples <= 0:
            probs = self.class_probabilities(self(x)["logits"])
            return {"probs": probs, "entropy": _entropy(probs)}
        self.check_input(x)
        feats = self.encode(x)
        passes = mc_samples if self.vaems is not None else 1  # without VAEM every pass is identical
        sum_p = sum_p2 = sum_h = 0.0
        for _ in range(passes):
            p = self.class_probabilities(self.decode(feats, sample=True)["logits"])
            sum_p, sum_p2, sum_h = sum_p + p, sum_p2 + p * p, sum_h + _entropy(p)
        mean_p = sum_p / passes
        variance = (sum_p2 / passes - mean_p * mean_p).clamp_min(0).sum(dim=1, keepdim=True)
        entropy = _entropy(mean_p)
        return {
            "probs": mean_p,
            "entropy": entropy,
            "variance": variance,
            "mutual_information": (entropy - sum_h / passes).clamp_min(0),
        }

    def make_loss(self, **kwargs) -> nn.Module:
        """The paper loss (``VUNetLoss``); kwargs override its weights."""
        return VUNetLoss(**kwargs)


class VUNetLoss(nn.Module):
    """L = 0.74·segmentation + 0.15·L_recon + 0.11·kl_weight_scale·L_KL (paper Eqs. 3–5, 10–12).

    Segmentation is BCE for K = 1 (paper) and cross-entropy for K > 1, over supervised pixels only
    (``targets["valid"]``). L_recon and L_KL regularise features and latents and do not use labels,
    so the valid mask does not apply to them.

    Args:
        seg_weight, recon_weight, kl_weight: α, β, γ of the paper.
        class_weight: optional ``(K,)`` cross-entropy class weights (K > 1).

    Attributes:
        kl_weight_scale: multiplies γ; a trainer may ramp it 0 → 1 for KL warm-up (default 1).
    """

    def __init__(self, seg_weight: float = 0.74, recon_weight: float = 0.15, kl_weight: float = 0.11,
                 class_weight: torch.Tensor | None = None):
        super().__init__()
        self.seg_weight, self.recon_weight, self.kl_weight = seg_weight, recon_weight, kl_weight
        self.kl_weight_scale = 1.0
        self.register_buffer("class_weight", None if class_weight is None else torch.as_tensor(
            class_weight, dtype=torch.float32))

    @staticmethod
    def kl_divergence(mu: list[torch.Tensor], logvar: list[torch.Tensor]) -> torch.Tensor:
        """KL(N(μ, σ²) ‖ N(0, I)): sum over latent dims, mean over batch, mean over levels (scalar)."""
        if not mu:
            return torch.zeros(())
        per_level = [(-0.5 * (1 + lv - m * m - lv.exp()).sum(dim=1)).mean()
                     for m, lv in zip(mu, logvar)]
        return torch.stack(per_level).mean()

    @staticmethod
    def reconstruction(pairs) -> torch.Tensor:
        """Eq. 10–11: mean over levels of the element-mean squared difference (scalar)."""
        return torch.stack([F.mse_loss(pred, target) for pred, target in pairs]).mean()

    def forward(self, outputs: dict, targets: dict) -> dict[str, torch.Tensor]:
        """Weighted paper loss.

        Args:
            outputs: training dict of ``VUNet.forward``.
            targets: ``labels (B, H, W) int64``, optional ``valid`` and ``pixel_weight (B, H, W)``
                (the latter weights the segmentation term only).

        Returns:
            ``loss`` and the weighted terms ``segmentation``, ``reconstruction``, ``kl`` (scalars).
        """
        logits = outputs["logits"]
        weight = None if self.class_weight is None else self.class_weight.to(logits.device)
        seg = masked_cross_entropy(logits, targets["labels"], targets_pixel_mask(targets), weight)
        recon = self.reconstruction(outputs["recon_pairs"])
        kl = self.kl_divergence(outputs["mu"], outputs["logvar"]).to(logits.device)
        terms = {
            "segmentation": self.seg_weight * seg,
            "reconstruction": self.recon_weight * recon,
            "kl": self.kl_weight * self.kl_weight_scale * kl,
        }
        return {"loss": sum(terms.values()), **terms}
