"""The one contract every network in this package follows.

A network is built from a frozen dataclass config and exposes:

* ``forward(x)``: ``x`` is ``(B, C_in, H, W) float32``, normalised. In training mode it returns a
  dict holding everything its paper loss needs; in eval mode it returns a dict with ``"logits"``
  ``(B, K, H, W)`` plus raw auxiliary tensors (model-specific keys).
* ``predict(x, mc_samples=0)``: probabilities and display-ready auxiliary maps, every value a
  ``(B, k, H, W) float32`` tensor at input resolution. Inputs of any size are padded internally.
* ``map_specs(mc_samples)``: the names and channel counts ``predict`` will return, so that callers
  can allocate outputs before running.
* ``make_loss()``: the paper's loss as an ``nn.Module`` taking ``(outputs, targets)``.

The engine never branches on a model's name; it asks ``aux_kinds``/``map_specs`` instead.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class MapSpec:
    """One output map of ``predict``.

    Attributes:
        name: key in the dict returned by ``predict`` (e.g. ``"probs"``, ``"entropy"``).
        channels: number of channels ``k`` of the ``(B, k, H, W)`` tensor.
        kind: ``"probability"``, ``"uncertainty"``, ``"background"`` or ``"attention"``.
        value_range: expected display range ``(low, high)``; used as contrast limits.
        description: one line for users.
    """

    name: str
    channels: int
    kind: str
    value_range: tuple[float, float]
    description: str


@dataclass(frozen=True)
class ModelConfig:
    """Fields every model config has; subclasses add their own (frozen dataclasses).

    Attributes:
        in_channels: input channels (1 grey, 3 RGB).
        num_classes: output classes K (3 = background / interior / boundary for instances).
    """

    in_channels: int = 3
    num_classes: int = 3

    def to_dict(self) -> dict:
        """JSON-serialisable dict of all fields."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ModelConfig":
        """Build from a dict, refusing unknown fields with a clear message."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(
                f"unknown config field(s) {sorted(unknown)} for {cls.__name__}; known: {sorted(known)}"
            )
        converted = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        return cls(**converted)


@dataclass
class PretrainStage:
    """An auxiliary network trained before the main one (ReSeg-UNet's reconstruction stage).

    The trainer optimises ``network`` on ``loss(network(make_input(targets)), targets)`` and then
    builds the main loss with ``model.make_loss(**{loss_kwarg: network})``.

    Attributes:
        name: shown in progress output, e.g. ``"reconstruction"``.
        network: the module trained in this stage.
        loss: ``loss(outputs, targets) -> {"loss": scalar, ...components}``.
        make_input: ``targets -> network input tensor``.
        loss_kwarg: keyword under which ``make_loss`` receives the trained ``network``.
    """

    name: str
    network: nn.Module
    loss: nn.Module
    make_input: Callable[[dict], torch.Tensor]
    loss_kwarg: str


class SegmentationModel(nn.Module):
    """Base class of the five networks.

    Class attributes a subclass sets:
        name: registry name (``"vunet"``...).
        paper: short citation.
        description: one line shown to users.
        config_class: its frozen dataclass config.
        presets: ``{"paper": {...}, "lite": {...}}`` config overrides.
        aux_kinds: which auxiliary map kinds it offers (``"uncertainty"``, ``"background"``,
            ``"attention"``).
        translation_equivariant: False when pooling over the whole tile (V-UNet latents, GCA strip
            pooling): such models must be tiled at their training size and blended.
        size_multiple: ``forward`` needs H and W divisible by this.
        channels_last_on_cpu: ``predict`` hands CPU convolutions a channels-last (NHWC) copy of
            the input, which oneDNN runs faster (same values to float precision); False where it
            measured slower (GCA-ResUNet's row/column pooling). ``napari-medseg bench models``.
    """

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    description: ClassVar[str] = ""
    config_class: ClassVar[type[ModelConfig]] = ModelConfig
    presets: ClassVar[dict[str, dict]] = {}
    aux_kinds: ClassVar[tuple[str, ...]] = ()
    translation_equivariant: ClassVar[bool] = True
    size_multiple: ClassVar[int] = 32
    channels_last_on_cpu: ClassVar[bool] = True

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config

    # ----------------------------------------------------------------- helpers for subclasses
    def check_input(self, x: torch.Tensor) -> None:
        """Raise a clear error for wrong rank, channels or size.

        Args:
            x: ``(B, C_in, H, W)`` float tensor.
        """
        if x.ndim != 4:
            raise ValueError(f"{self.name}: expected a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
        if x.shape[1] != self.config.in_channels:
            raise ValueError(
                f"{self.name}: expected {self.config.in_channels} input channel(s), got {x.shape[1]}"
            )
        m = self.size_multiple
        h, w = x.shape[-2:]
        if h % m or w % m:
            raise ValueError(
                f"{self.name}: height and width must be multiples of {m}; got {h}x{w}, "
                f"pad to {-(-h // m) * m}x{-(-w // m) * m} (predict() pads automatically)"
            )

    def pad_to_multiple(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Reflect-pad ``x`` (B, C, H, W) on the bottom/right to multiples of ``size_multiple``.

        Returns:
            The padded tensor and the original ``(H, W)``.
        """
        h, w = x.shape[-2:]
        m = self.size_multiple
        ph, pw = (-h) % m, (-w) % m
        if ph or pw:
            mode = "reflect" if ph < h and pw < w else "replicate"
            x = F.pad(x, (0, pw, 0, ph), mode=mode)
        return x, (h, w)

    # ----------------------------------------------------------------- the contract
    def class_probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits (B, K, H, W) → probabilities (sigmoid for K = 1, else softmax)."""
        return torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, dim=1)

    def map_specs(self, mc_samples: int = 0) -> list[MapSpec]:
        """Maps ``predict`` returns. Subclasses extend with their auxiliary maps."""
        return [
            MapSpec("probs", self.config.num_classes, "probability", (0.0, 1.0), "class probabilities")
        ]

    @torch.no_grad()
    def predict(self, x: torch.Tensor, mc_samples: int = 0) -> dict[str, torch.Tensor]:
        """Probabilities and auxiliary maps for any input size.

        Args:
            x: ``(B, C_in, H, W) float32`` normalised image.
            mc_samples: Monte-Carlo samples (only models offering ``"uncertainty"`` use it).

        Returns:
            ``{spec.name: (B, spec.channels, H, W) float32}`` for every spec in ``map_specs``.
        """
        was_training = self.training
        self.eval()
        padded, (h, w) = self.pad_to_multiple(x)
        if self.channels_last_on_cpu and padded.device.type == "cpu":
            padded = padded.contiguous(memory_format=torch.channels_last)
        maps = self._predict_padded(padded, mc_samples)
        if was_training:
            self.train()
        return {k: v[..., :h, :w].float().contiguous() for k, v in maps.items()}

    def _predict_padded(self, x: torch.Tensor, mc_samples: int) -> dict[str, torch.Tensor]:
        """Default: probabilities only. ``x`` is already padded."""
        return {"probs": self.class_probabilities(self(x)["logits"])}

    def make_loss(self, **kwargs) -> nn.Module:
        """The paper's loss for this model.

        The returned module is called as ``loss(outputs, targets)`` where ``outputs`` is the
        training-mode ``forward`` dict and ``targets`` holds ``"labels"`` ``(B, H, W) int64``,
        ``"image"`` ``(B, C_in, H, W) float32`` (the network input) and optionally ``"valid"``
        ``(B, H, W) float32`` (1 = supervised pixel). It returns a dict with the total under
        ``"loss"`` and each weighted term under its own name (for logging).
        """
        raise NotImplementedError

    def pretrain_stage(self) -> PretrainStage | None:
        """An auxiliary network to train before this one, or None (the default)."""
        return None

    def num_parameters(self) -> int:
        """Total parameter count (trainable or not)."""
        return sum(p.numel() for p in self.parameters())
