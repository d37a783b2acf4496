"""Explain image files with a model from any weights source: read and preprocess them as
`resnetkit predict` does, attribute, and write the figure (what `resnetkit explain` runs)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from ..data.preprocess import load_images, model_input
from ..errors import UserError
from ..evaluate import check_outputs
from ..untrusted import regular_file, shown
from ..weights.sources import load_source
from .attributions import attribute, check_method, check_model, find_layer, resolve_targets
from .figure import MAX_FIGURE_IMAGES, check_output, explain_figure

# exported files run in engines without autograd
EXPORTED = {".onnx": "an ONNX", ".xml": "an OpenVINO"}


def explain_files(source: str | Path, image_paths: Sequence[str | Path], out: str | Path,
                  method: str = "gradcam", layer: str | None = None, target: Any = None,
                  top_k: int = 3) -> dict[str, Any]:
    """Explain each image file with the model of `source` and write the figure to `out`.

    source: a resnetkit checkpoint, run folder, registry tag or foreign weights file (see
    weights.sources.load_source); its classes and preprocessing are used. image_paths: the
    files, each read and preprocessed exactly as `predict` reads them. method, layer,
    target: see attributions.attribute (target None: each image's predicted class). top_k:
    classes listed per image. Returns {"images": [{"file", "top": [{"class", "index",
    "prob"}], "target": {"class", "index"}}], "method", "layer" (None unless gradcam),
    "output"}. Raises UserError for an exported .onnx or .xml source (no gradients), an
    unknown method or a layer given to another method, a top_k below 1, no images or more
    than MAX_FIGURE_IMAGES, an image that is not a regular file or cannot be decoded
    (naming it, before the model runs), an output that cannot be written, and as
    attribute does."""
    kind = EXPORTED.get(Path(str(source)).suffix.lower())
    if kind:
        raise UserError(f"{shown(source)} is {kind} export, which has no gradients to explain "
                        f"with: use the checkpoint it was exported from")
    check_method(method, layer)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise UserError(f"top_k must be a whole number >= 1, got {shown(repr(top_k))}")
    if not image_paths:
        raise UserError("no images given: name at least one image file")
    if len(image_paths) > MAX_FIGURE_IMAGES:
        raise UserError(f"{len(image_paths)} images given: explain at most "
                        f"{MAX_FIGURE_IMAGES} at a time, one figure each")
    out = check_output(out)
    files = [regular_file(p, "image file") for p in image_paths]

    model, info = load_source(source)
    model = check_model(model)
    layer_name = find_layer(model, layer)[0] if method == "gradcam" else None
    pre = info["preprocess"]
    raw = load_images(files, pre)
    x = model_input(raw, pre)

    with torch.no_grad():
        logits = model(x).float()
    check_outputs(logits, source, lambda row: str(files[row]))
    probs = logits.softmax(1)
    targets = resolve_targets(model, x, target, logits)
    heat = attribute(model, x, method, targets, layer)

    classes = info.get("classes") or [str(j) for j in range(probs.shape[1])]
    p, idx = probs.topk(min(top_k, probs.shape[1]), 1)
    rows = []
    for f, pr, ix, t in zip(files, p.tolist(), idx.tolist(), targets.tolist()):
        rows.append({"file": str(f),
                     "top": [{"class": classes[j], "index": j, "prob": q} for j, q in zip(ix, pr)],
                     "target": {"class": classes[t], "index": t}})
    explain_figure(raw, heat, [[(c["class"], c["prob"]) for c in r["top"]] for r in rows], out,
                   titles=[f"{f.name}, explaining {classes[t]}"
                           for f, t in zip(files, targets.tolist())])
    return {"images": rows, "method": method, "layer": layer_name, "output": str(out)}
