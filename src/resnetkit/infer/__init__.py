"""Inference: the fast path (optimize), prediction from checkpoints, export."""
from .predict import predict

__all__ = ["predict"]
