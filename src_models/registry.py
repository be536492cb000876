"""A small explicit registry: ``create_model(name, preset=..., **overrides)`` and ``list_models()``."""
from __future__ import annotations

from .base import SegmentationModel

_REGISTRY: dict[str, type[SegmentationModel]] = {}


def register(cls: type[SegmentationModel]) -> type[SegmentationModel]:
    """Class decorator adding a model to the registry under ``cls.name``."""
    if not cls.name or cls.name in _REGISTRY:
        raise ValueError(f"model name {cls.name!r} is empty or already registered")
    _REGISTRY[cls.name] = cls
    return cls


def list_models() -> list[str]:
    """Registered model names, in registration order."""
    return list(_REGISTRY)


def model_class(name: str) -> type[SegmentationModel]:
    """The class registered as ``name``; an unknown name raises ``KeyError`` listing the choices."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; choose one of: {', '.join(_REGISTRY)}") from None


def build_config(name: str, preset: str = "lite", **overrides):
    """The frozen config of ``name`` for ``preset`` with ``overrides`` applied."""
    cls = model_class(name)
    if preset not in cls.presets:
        raise KeyError(f"unknown preset {preset!r} for {name}; choose one of: {', '.join(cls.presets)}")
    values = {**cls.presets[preset], **overrides}
    return cls.config_class.from_dict(values)


def create_model(name: str, preset: str = "lite", **overrides) -> SegmentationModel:
    """Build a registered model.

    Args:
        name: one of ``list_models()``.
        preset: ``"lite"`` (narrow, CPU-trainable) or ``"paper"`` (the paper's widths).
        **overrides: config fields, e.g. ``in_channels=1, num_classes=2``.
    """
    return model_class(name)(build_config(name, preset, **overrides))


def model_from_config(name: str, config: dict) -> SegmentationModel:
    """Rebuild a model from a full config dict (as stored in a weights card)."""
    cls = model_class(name)
    return cls(cls.config_class.from_dict(config))
