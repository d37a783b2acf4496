"""The page's "why?" view: a Grad-CAM heatmap (explain.grad_cam) of the predicted class over
the image the model saw (the upload resized and centre-cropped by its preprocessing), both as
PNG data URLs the page stacks."""
from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
import torch
from PIL import Image

# The heat ramp, from cold (transparent blue) to hot (opaque red): value -> RGB, by linear
# interpolation between these stops; alpha grows with the value, so that what the model did
# not use stays visible underneath.
STOPS = np.array([[0.0, 0, 0, 255], [0.35, 0, 255, 255], [0.6, 255, 255, 0],
                  [1.0, 255, 0, 0]], dtype=np.float64)
MAX_ALPHA = 0.7


def heat_rgba(heat: torch.Tensor) -> np.ndarray:
    """(H, W) non-negative heat -> (H, W, 4) uint8 RGBA, scaled by its maximum (zero stays
    "not looked at"; an all-zero map is fully transparent)."""
    h = heat.detach().float().nan_to_num(0.0).clamp(min=0).cpu().numpy().astype(np.float64)
    top = h.max()
    v = h / top if top > 0 else h
    rgb = np.stack([np.interp(v, STOPS[:, 0], STOPS[:, i]) for i in (1, 2, 3)], -1)
    alpha = (255 * MAX_ALPHA * np.sqrt(v))[..., None]
    return np.concatenate([rgb, alpha], -1).round().clip(0, 255).astype(np.uint8)


def png_url(pixels: np.ndarray) -> str:
    """(H, W, C) uint8 with C 1, 3 or 4 -> a data: URL of the PNG."""
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[pixels.shape[-1]]
    img = Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def why(model: Any, image: np.ndarray, x: torch.Tensor, target: int) -> dict[str, Any]:
    """Grad-CAM of class `target` for one image: image, the decoded upload (C, H, W) uint8
    at the model's size; x, its preprocessed (1, C, H, W) input. Answers {"method", "layer",
    "heatmap" (RGBA PNG URL), "view" (the image as the model saw it, PNG URL)}."""
    from ..explain.attributions import find_layer, grad_cam
    layer = find_layer(model)[0]
    heat = grad_cam(model, x, target=target, layer=layer)[0]
    return {"method": "gradcam", "layer": layer, "heatmap": png_url(heat_rgba(heat)),
            "view": png_url(np.ascontiguousarray(image.transpose(1, 2, 0)))}
