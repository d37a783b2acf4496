"""Datasets, batched tensor transforms and dataset lookup."""
from .lookup import (DATASETS, find_fashion_mnist, in_memory_or_streamed, load_dataset,
                     match_classes, materialize, restrict_to_classes, select_classes)
from .readers import ArrayDataset, ImageFolder, StreamedFolder, load_image, read_idx

__all__ = ["ArrayDataset", "ImageFolder", "DATASETS", "StreamedFolder", "find_fashion_mnist",
           "in_memory_or_streamed", "load_dataset", "load_image", "match_classes", "materialize",
           "read_idx", "restrict_to_classes", "select_classes"]
