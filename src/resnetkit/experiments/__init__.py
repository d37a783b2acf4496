"""The ResNet paper's own experiments, composed from training and analysis: the degradation
problem of plain networks (figure 6) and the layer responses (figure 7)."""
from .degradation import DEFAULT_MODELS, degradation, plot_degradation
from .responses import layer_responses, responses

__all__ = ["DEFAULT_MODELS", "degradation", "layer_responses", "plot_degradation", "responses"]
