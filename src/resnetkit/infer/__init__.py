"""Inference: prediction from checkpoints."""
from .predict import predict

__all__ = ["predict"]
