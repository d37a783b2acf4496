"""Training: TrainConfig, recipes, the Trainer and its step."""
from .config import RESUMABLE, TrainConfig, build_config, load_recipe, recipe_names
from .start import start_run
from .step import TrainStep
from .trainer import NonFiniteLoss, Trainer

__all__ = ["RESUMABLE", "TrainConfig", "TrainStep", "Trainer", "NonFiniteLoss", "build_config",
           "load_recipe", "recipe_names", "start_run"]
