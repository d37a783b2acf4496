"""resnetkit: the ResNet family and its whole life cycle, on PyTorch."""
from .config import ResNetConfig
from .model import ResNet
from .runtime import tune_allocator
from .zoo import PRESETS, create_model, get_config, list_models

__version__ = "0.1.0"
__all__ = ["ResNetConfig", "ResNet", "PRESETS", "create_model", "get_config", "list_models",
           "tune_allocator", "__version__"]
