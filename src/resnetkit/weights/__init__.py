"""Weights on disk: the checkpoint format every verb reads and writes, foreign formats
(torchvision, timm, Paddle), the registry of published weights and their downloads."""
from .checkpoint import (atomic_write, check_finite, check_preprocess, config_to_dict, load_model, load_state,
                         load_weights_into, read_checkpoint, remove_partial_files, save_state,
                         save_weights)

__all__ = ["atomic_write", "check_finite", "check_preprocess", "config_to_dict", "load_model", "load_state",
           "load_weights_into", "read_checkpoint", "remove_partial_files", "save_state",
           "save_weights"]
