"""Inference: open any model source once (source), run it on the engine and at the precision
chosen in one place (runner, over backends/), predict and evaluate, export, quantize."""
from .predict import evaluate_source, predict
from .runner import RunConfig, Runner, open_runner
from .source import Source, open_source

__all__ = ["RunConfig", "Runner", "Source", "evaluate_source", "open_runner", "open_source",
           "predict"]
