"""Training: TrainConfig, recipes, the Trainer, checkpoints."""
from .config import TrainConfig, build_config, load_recipe, recipe_names
from .trainer import NonFiniteLoss, Trainer, evaluate

__all__ = ["TrainConfig", "Trainer", "NonFiniteLoss", "build_config", "evaluate", "load_recipe",
           "recipe_names"]
