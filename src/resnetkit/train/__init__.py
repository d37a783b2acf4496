"""Training: TrainConfig, recipes, the Trainer."""
from .config import RESUMABLE, TrainConfig, build_config, load_recipe, recipe_names
from .start import start_run
from .trainer import NonFiniteLoss, Trainer

__all__ = ["RESUMABLE", "TrainConfig", "Trainer", "NonFiniteLoss", "build_config", "load_recipe",
           "recipe_names", "start_run"]
