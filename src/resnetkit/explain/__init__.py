"""What a trained ResNet looks at: attributions (Grad-CAM and Captum's integrated gradients
and occlusion) as heatmaps, and their pictures. Captum is imported when a method runs, so
this package imports without the `explain` extra."""
from .attributions import (METHODS, attribute, grad_cam, integrated_gradients, layer_names,
                           occlusion)
from .figure import explain_figure
from .files import explain_files

__all__ = ["METHODS", "attribute", "explain_figure", "explain_files", "grad_cam",
           "integrated_gradients", "layer_names", "occlusion"]
