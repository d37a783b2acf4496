"""Top-k predictions for image files from a checkpoint that knows its own preprocessing."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..data.readers import IMAGE_SUFFIXES, load_image
from ..errors import UserError
from ..evaluate import check_outputs, preprocess
from ..untrusted import regular_file, shown
from ..weights.sources import load_source


def expand_inputs(paths: list[str | Path]) -> list[Path]:
    """Files as given; folders expanded to the image files inside them (sorted, by suffix).
    Only regular files are read: a FIFO, a device or a socket, given or found in a folder,
    is a UserError naming it (reading one would block for ever), as is a missing file."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = []
            for f in sorted(p.rglob("*")):
                if f.suffix.lower() not in IMAGE_SUFFIXES or f.is_dir():
                    continue  # a folder named like an image is walked, not read
                if not f.exists() and f.is_symlink():
                    continue  # a dangling link
                found.append(regular_file(f, "image file"))
            if not found:
                raise UserError(f"folder {shown(p)} holds no image files")
            out += found
        else:
            out.append(regular_file(p, "image file"))
    if not out:
        raise UserError("no images given")
    return out


def predict(checkpoint: str | Path, images: list[str | Path], top_k: int = 5,
            batch_size: int = 64, engine: str | None = None, precision: str = "auto",
            calibration: str | None = None) -> list[dict[str, Any]]:
    """[{"file", "top": [{"class", "index", "prob"}...]}] for each image, best first.

    The checkpoint's metadata gives the architecture, class names, input size, channels and
    normalisation, so nothing has to be repeated. Raises UserError for a file that is not a
    regular file or cannot be decoded (before any prediction is made), and for a model
    whose outputs on an image are NaN or infinite (naming the image). engine, precision,
    calibration: run on that engine at that precision (see infer.engines.open_source; a
    precision or calibration without an engine runs on the torch engine); an exported .onnx
    or .xml file runs in ONNX Runtime or OpenVINO."""
    if top_k < 1:
        raise UserError(f"top_k must be >= 1, got {top_k}")
    if batch_size < 1:
        raise UserError(f"batch size must be >= 1, got {batch_size}")
    files = expand_inputs(images)
    exported = Path(checkpoint).suffix in (".onnx", ".xml")
    if engine is not None or precision != "auto" or calibration or exported:
        from .engines import open_source
        run, info = open_source(checkpoint, engine or ("auto" if exported else "torch"),
                                precision, calibration)
        if "preprocess" not in info:
            raise UserError(f"{shown(checkpoint)} has no preprocessing metadata; export it "
                            f"from a trained checkpoint with `resnetkit export RUN_DIR`")
    else:
        model, info = load_source(checkpoint)
        run = model.eval()
    pre = info.get("preprocess")
    if pre is None:  # a resnetkit checkpoint written without it (or by hand)
        raise UserError(f"{shown(checkpoint)} has no preprocessing metadata (mean, std, input "
                        f"size), so its images cannot be prepared; predict with a checkpoint "
                        f"that resnetkit trained, exported or converted")
    size, chans = pre["image_size"], pre.get("in_chans") or len(pre["mean"])
    x = torch.stack([load_image(f, size, chans, pre.get("resize", 0),
                                pre.get("interpolation", "bilinear")) for f in files])
    results = []
    with torch.no_grad():
        for i in range(0, len(files), batch_size):
            batch = files[i:i + batch_size]
            logits = run(preprocess(x[i:i + batch_size], pre["mean"], pre["std"])).float()
            check_outputs(logits, checkpoint, lambda row: str(batch[row]))
            probs = check_outputs(logits.softmax(1), checkpoint, lambda row: str(batch[row]))
            classes = info.get("classes") or [str(j) for j in range(probs.shape[1])]
            p, idx = probs.topk(min(top_k, probs.shape[1]), 1)
            for f, pr, ix in zip(batch, p.tolist(), idx.tolist()):
                results.append({"file": str(f), "top": [
                    {"class": classes[j], "index": j, "prob": q} for j, q in zip(ix, pr)]})
    return results
