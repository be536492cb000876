"""Five published segmentation networks and their paper losses, in pure PyTorch.

No napari or Qt here. Use the registry::

    from src_models import create_model, list_models
    net = create_model("vunet", preset="lite", in_channels=3, num_classes=3)
"""
from . import gca_resunet, iau_net, pranet_v2, reseg_unet, vunet  # noqa: F401  (register the models)
from .base import MapSpec, ModelConfig, SegmentationModel
from .registry import build_config, create_model, list_models, model_class, model_from_config
from .weights_io import WeightsError, load_weights, read_card, save_weights

__all__ = [
    "MapSpec", "ModelConfig", "SegmentationModel", "WeightsError",
    "build_config", "create_model", "list_models", "model_class", "model_from_config",
    "load_weights", "read_card", "save_weights",
]
