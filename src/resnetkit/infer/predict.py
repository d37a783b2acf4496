"""Top-k predictions for image files from a checkpoint that knows its own preprocessing."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..data.readers import IMAGE_SUFFIXES, load_image
from ..errors import UserError
from ..evaluate import preprocess
from ..weights.sources import load_source


def expand_inputs(paths: list[str | Path]) -> list[Path]:
    """Files as given; folders expanded to the image files inside them (sorted)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise UserError(f"folder {p} holds no image files")
            out += found
        else:
            out.append(p)
    if not out:
        raise UserError("no images given")
    return out


def predict(checkpoint: str | Path, images: list[str | Path], top_k: int = 5,
            batch_size: int = 64, engine: str | None = None, precision: str = "auto",
            calibration: str | None = None) -> list[dict[str, Any]]:
    """[{"file", "top": [{"class", "index", "prob"}...]}] for each image, best first.

    The checkpoint's metadata gives the architecture, class names, input size, channels and
    normalisation, so nothing has to be repeated. Raises UserError for a file that cannot be
    decoded (before any prediction is made). engine, precision, calibration: run on that
    engine (see infer.engines.open_source); an exported .xml (OpenVINO IR) needs no engine."""
    if top_k < 1:
        raise UserError(f"top_k must be >= 1, got {top_k}")
    if engine is not None or str(checkpoint).endswith(".xml"):
        from .engines import open_source
        run, info = open_source(checkpoint, engine or "auto", precision, calibration)
        if "preprocess" not in info:
            raise UserError(f"{checkpoint} has no preprocessing metadata; export it from a "
                            f"trained checkpoint")
    elif str(checkpoint).endswith(".onnx"):
        from .export import onnx_meta, onnx_session
        sess = onnx_session(checkpoint)
        info = onnx_meta(sess, str(checkpoint))
        if "preprocess" not in info:
            raise UserError(f"{checkpoint} has no preprocessing metadata; export it from a "
                            f"trained checkpoint with `resnetkit export RUN_DIR`")

        def run(x: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
    else:
        model, info = load_source(checkpoint)
        run = model
    pre = info["preprocess"]
    size, chans = pre["image_size"], pre["in_chans"]
    files = expand_inputs(images)
    x = torch.stack([load_image(f, size, chans, pre.get("resize", 0),
                                pre.get("interpolation", "bilinear")) for f in files])
    results = []
    with torch.no_grad():
        for i in range(0, len(files), batch_size):
            probs = run(preprocess(x[i:i + batch_size], pre["mean"], pre["std"])).softmax(1)
            classes = info.get("classes") or [str(j) for j in range(probs.shape[1])]
            p, idx = probs.topk(min(top_k, probs.shape[1]), 1)
            for f, pr, ix in zip(files[i:i + batch_size], p.tolist(), idx.tolist()):
                results.append({"file": str(f), "top": [
                    {"class": classes[j], "index": j, "prob": q} for j, q in zip(ix, pr)]})
    return results
