"""Tiny stand-in networks for engine tests (no dependence on the five real models).

* :class:`TinyEquivariantNet`: 3×3 convs around one 2× pooling (translation-equivariant on a
  2-pixel grid, ``size_multiple`` 4), with an extra deterministic map ``"edge_entropy"``.
* :class:`TinyPooledNet`: adds a tile-wide average (global pooling: not equivariant), offers
  Monte-Carlo ``"variance"`` when ``mc_samples > 0``.
* :class:`ConvPair`: two 3×3 convs, receptive-field radius exactly 2.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from src_models.base import MapSpec, ModelConfig, SegmentationModel


class TinyEquivariantNet(SegmentationModel):
    """(B, C, H, W) → logits (B, K, H, W); H, W multiples of 4."""

    name = "tiny_equivariant"
    translation_equivariant = True
    size_multiple = 4

    def __init__(self, config: ModelConfig = ModelConfig(in_channels=3, num_classes=3)):
        super().__init__(config)
        self.inc = nn.Conv2d(config.in_channels, 8, 3, padding=1)
        self.mid = nn.Conv2d(8, 8, 3, padding=1)
        self.out = nn.Conv2d(16, config.num_classes, 3, padding=1)

    def forward(self, x):
        self.check_input(x)
        a = F.relu(self.inc(x))
        b = F.relu(self.mid(F.max_pool2d(a, 2)))
        b = F.interpolate(b, scale_factor=2, mode="nearest")
        return {"logits": self.out(torch.cat([a, b], 1))}

    def map_specs(self, mc_samples=0):
        return super().map_specs(mc_samples) + [
            MapSpec("edge_entropy", 1, "uncertainty", (0.0, 1.2), "entropy of the class probabilities")]

    def _predict_padded(self, x, mc_samples):
        probs = self.class_probabilities(self(x)["logits"])
        entropy = -(probs * torch.log(probs.clamp_min(1e-8))).sum(1, keepdim=True)
        return {"probs": probs, "edge_entropy": entropy}


class TinyPooledNet(TinyEquivariantNet):
    """Like :class:`TinyEquivariantNet` plus a tile-wide mean feature (not equivariant)."""

    name = "tiny_pooled"
    translation_equivariant = False

    def forward(self, x):
        self.check_input(x)
        a = F.relu(self.inc(x))
        b = F.relu(self.mid(F.max_pool2d(a, 2)))
        b = F.interpolate(b, scale_factor=2, mode="nearest") + a.mean(dim=(2, 3), keepdim=True)
        return {"logits": self.out(torch.cat([a, b], 1))}

    def map_specs(self, mc_samples=0):
        specs = SegmentationModel.map_specs(self, mc_samples)
        if mc_samples:
            specs.append(MapSpec("variance", 1, "uncertainty", (0.0, 0.25), "MC variance"))
        return specs

    def _predict_padded(self, x, mc_samples):
        logits = self(x)["logits"]
        if not mc_samples:
            return {"probs": self.class_probabilities(logits)}
        samples = torch.stack([self.class_probabilities(logits + 0.5 * torch.randn_like(logits))
                               for _ in range(mc_samples)])
        return {"probs": samples.mean(0), "variance": samples.var(0).sum(1, keepdim=True)}


class ConvPair(SegmentationModel):
    """Two 3×3 convolutions: receptive-field radius 2, size_multiple 1."""

    name = "conv_pair"
    size_multiple = 1

    def __init__(self, config: ModelConfig = ModelConfig(in_channels=1, num_classes=2)):
        super().__init__(config)
        self.net = nn.Sequential(nn.Conv2d(config.in_channels, 4, 3, padding=1), nn.Tanh(),
                                 nn.Conv2d(4, config.num_classes, 3, padding=1))

    def forward(self, x):
        return {"logits": self.net(x)}


def make(cls, seed: int = 0, **config):
    """A stand-in with fixed random weights, in eval mode."""
    torch.manual_seed(seed)
    model = cls(ModelConfig(**config)) if config else cls()
    return model.eval()
