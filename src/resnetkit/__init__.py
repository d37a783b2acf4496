"""resnetkit: the ResNet family and its whole life cycle, on PyTorch."""
from .config import ResNetConfig
from .model import ResNet
from .runtime import tune_allocator
from .weights.sources import create_model, resolve_data_config
from .weights.registry import list_weights
from .zoo import PRESETS, get_config, is_model, list_models

__version__ = "0.1.0"
__all__ = ["ResNetConfig", "ResNet", "PRESETS", "create_model", "get_config", "is_model",
           "list_models", "list_weights", "resolve_data_config", "tune_allocator", "__version__"]
