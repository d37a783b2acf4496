"""A model source run on what users give it: top-k predictions for image files (`resnetkit
predict`; the top-k answer itself is the server's too) and the scores on a dataset split
(`resnetkit eval`), on any engine, in the source's own preprocessing."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..data.preprocess import load_images, model_input
from ..data.readers import IMAGE_SUFFIXES
from ..errors import UserError
from ..evaluate import TTA_MAX_SHIFT, check_outputs, eval_data, evaluate, left_out_note
from ..untrusted import regular_file, shown
from .runner import RunConfig, open_runner
from .source import kind_of, open_source


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


def top_answers(probs: torch.Tensor, ks: list[int], classes: list[str]
                ) -> list[list[dict[str, Any]]]:
    """For each row of class probabilities, its ks[row] best classes, best first:
    [{"class", "index", "prob"}, ...]."""
    p, idx = probs.topk(min(max(ks), probs.shape[1]), 1)
    return [[{"class": classes[j], "index": j, "prob": q} for j, q in zip(ix[:k], pr[:k])]
            for k, pr, ix in zip(ks, p.tolist(), idx.tolist())]


def predict(checkpoint: str | Path, images: list[str | Path], top_k: int = 5,
            batch_size: int = 64, engine: str | None = None, precision: str = "auto",
            calibration: str | None = None) -> list[dict[str, Any]]:
    """[{"file", "top": [{"class", "index", "prob"}...]}] for each image, best first.

    The checkpoint's metadata gives the architecture, class names, input size, channels and
    normalisation, so nothing has to be repeated. Raises UserError for a source without
    preprocessing, a file that is not a regular file or cannot be decoded (before any
    prediction is made), and for a model whose outputs on an image are NaN or infinite
    (naming the image). engine, precision, calibration: run on that engine at that
    precision (see infer.runner.RunConfig; a precision or calibration without an engine
    runs on the torch engine, none of them the checkpoint's model as it is); an exported
    .onnx or .xml file runs in ONNX Runtime or OpenVINO."""
    if top_k < 1:
        raise UserError(f"top_k must be >= 1, got {top_k}")
    if batch_size < 1:
        raise UserError(f"batch size must be >= 1, got {batch_size}")
    files = expand_inputs(images)
    plain = engine is None and precision == "auto" and not calibration
    config = RunConfig(engine=engine or ("auto" if kind_of(checkpoint) else "torch"),
                       precision=precision, calibration=calibration or None,
                       reference=plain and not kind_of(checkpoint))
    config.check(kind_of(checkpoint), checkpoint)
    source = open_source(checkpoint)
    pre = source.meta.need_preprocess()
    x = load_images(files, pre)
    run = open_runner(source, config)
    results = []
    for i in range(0, len(files), batch_size):
        batch = files[i:i + batch_size]
        logits = run(model_input(x[i:i + batch_size], pre))
        check_outputs(logits, checkpoint, lambda row: str(batch[row]))
        probs = check_outputs(logits.softmax(1), checkpoint, lambda row: str(batch[row]))
        names = source.meta.class_names(probs.shape[1])
        results += [{"file": str(f), "top": top} for f, top in
                    zip(batch, top_answers(probs, [top_k] * len(batch), names))]
    return results


def evaluate_source(source: str | Path, dataset: str = "fashion-mnist", split: str = "test",
                    data_dir: str | None = None, engine: str | None = None,
                    precision: str = "auto", calibration: str | None = None,
                    tta_flip: bool = False, batch_size: int = 0,
                    tta_shift: int = 0) -> dict[str, Any]:
    """`resnetkit eval`: the result of evaluate.evaluate (top-1, top-5, loss, per-class
    accuracy, confusion) plus "engine" and "precision", for any source on a dataset split.
    The split is read at the model's input size and channels, in its preprocessing and
    labelled by its classes by name (evaluate.eval_data, the same for every engine), before
    any export or calibration. engine, precision, calibration: see infer.runner.RunConfig
    (engine None: the checkpoint's model as it is, unless a precision or calibration asks
    for an engine, "auto" then). batch_size: 0 for 1,024 images a batch with the model as
    it is, 256 on an engine."""
    if not 0 <= tta_shift <= TTA_MAX_SHIFT:
        raise UserError(f"--tta-shift must be from 0 to {TTA_MAX_SHIFT} pixels, got {tta_shift}")
    kind = kind_of(source)
    plain = engine is None and precision == "auto" and not calibration and not kind
    config = RunConfig(engine=engine or "auto", precision=precision,
                       calibration=calibration or None, data_dir=data_dir, reference=plain)
    config.check(kind, source)
    src = open_source(source)
    pre = src.meta.need_preprocess()
    classes = src.meta.classes
    data, left_out = eval_data(dataset, split, data_dir, pre, pre["in_chans"], classes,
                               len(classes) if classes is not None else src.outputs)
    run = open_runner(src, config)
    r = evaluate(run, data, pre["mean"], pre["std"], pre["image_size"],
                 batch_size or (1024 if plain else 256), tta_flip=tta_flip, tta_shift=tta_shift,
                 source=source, where=f"{dataset} {split}")
    return {**r, "engine": run.engine, "precision": run.precision, **left_out_note(left_out)}
