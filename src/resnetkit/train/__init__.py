"""Training: TrainConfig, recipes, the Trainer."""
from .config import RESUMABLE, TrainConfig, build_config, load_recipe, recipe_names
from .trainer import NonFiniteLoss, Trainer, start_run

__all__ = ["RESUMABLE", "TrainConfig", "Trainer", "NonFiniteLoss", "build_config", "load_recipe",
           "recipe_names", "start_run"]
