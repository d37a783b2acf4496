"""Datasets, batched tensor transforms and dataset lookup."""
from .lookup import DATASETS, find_fashion_mnist, load_dataset, materialize
from .readers import ArrayDataset, ImageFolder, load_image, read_idx

__all__ = ["ArrayDataset", "ImageFolder", "DATASETS", "find_fashion_mnist", "load_dataset",
           "load_image", "materialize", "read_idx"]
