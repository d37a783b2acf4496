"""The grammar of the `resnetkit` command: every verb, its arguments and their help texts.
cli.py holds what each verb does."""
from __future__ import annotations

import argparse
import dataclasses

DESCRIPTION = "resnetkit: the ResNet family and its whole life cycle (inspect, train, " \
              "evaluate, predict, export, benchmark)."


def _verb(sub, name: str, help: str, json: bool = True) -> argparse.ArgumentParser:
    s = sub.add_parser(name, help=help, allow_abbrev=False)  # --epoch is a mistake, not --epochs
    if json:
        s.add_argument("--json", action="store_true",
                       help="print JSON (schemas in resnetkit/analysis/schemas/)")
    return s


def _model_args(s: argparse.ArgumentParser, image: int = 224, model_required: bool = True) -> None:
    s.add_argument("model", nargs=None if model_required else "?",
                   help="preset name (see `resnetkit models`)")
    s.add_argument("overrides", nargs="*", help="config overrides, key=value")
    s.add_argument("--image-size", type=int, default=image, help="input side in pixels")


def _train_args(s: argparse.ArgumentParser) -> None:
    """--recipe, --resume, --nproc and every TrainConfig field (see _train_fields)."""
    s.add_argument("--recipe", default=None, help="recipe name or .toml path")
    s.add_argument("--resume", metavar="RUN_DIR", default=None, help="continue a run")
    s.add_argument("--nproc", type=int, default=1,
                   help="processes on this machine (DDP under torchrun; default 1)")
    _train_fields(s)


def _train_fields(s: argparse.ArgumentParser) -> None:
    """Every TrainConfig field as --field (and --field-with-dashes), help from the field."""
    from .options import field_types, kind_name
    from .train import TrainConfig
    types = field_types(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flags = dict.fromkeys([f"--{f.name}", f"--{f.name.replace('_', '-')}"])
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        s.add_argument(*flags, dest=f.name, default=argparse.SUPPRESS,
                       metavar=kind_name(types[f.name]).replace(" or ", "|").upper(),
                       help=f"{f.metadata['help']} (default: {default!r})")


def _verb_args(sub) -> None:
    s = _verb(sub, "describe", "layer-by-layer walk-through with sizes and depth")
    _model_args(s)
    s.add_argument("--expand", action="store_true", help="show every block, unfolded")

    s = _verb(sub, "summary", "per-layer table, params, MACs, memory")
    _model_args(s)
    s.add_argument("--batch", type=int, default=1, help="batch size for the memory figures")
    s.add_argument("--depth", type=int, default=2, help="nesting depth of the table (0: all)")

    s = _verb(sub, "flops", "MACs/FLOPs by op kind and stage, or of single blocks")
    _model_args(s, model_required=False)
    s.add_argument("--block", action="append",
                   help="KIND:IN[->OUT][/STRIDE], e.g. basic:64 or bottleneck:256 (repeatable)")

    s = _verb(sub, "compare", "models side by side (paper table 1)")
    s.add_argument("models", nargs="+", help="NAME or NAME:key=value,key=value")
    s.add_argument("--override", action="append", help="key=value applied to every model")
    s.add_argument("--image-size", type=int, default=224, help="input side in pixels")
    s.add_argument("--no-memory", action="store_true", help="skip the measured memory column")

    s = _verb(sub, "diagram", "draw the network (SVG, or PNG)", json=False)
    _model_args(s)
    s.add_argument("-o", "--output", default=None, help="file .svg or .png (default MODEL.svg)")

    s = _verb(sub, "train", "train (see `resnetkit recipes`); --key value overrides", json=False)
    _train_args(s)

    s = _verb(sub, "eval", "top-1/top-5, per-class accuracy, confusion matrix")
    s.add_argument("checkpoint", help="a .safetensors file or a run folder")
    _data_args(s)
    s.add_argument("--split", default="test", choices=["train", "test"], help="which split")
    s.add_argument("--tta-flip", action="store_true",
                   help="average the probabilities of each image and its mirror image")
    s.add_argument("--tta-shift", type=int, default=0, metavar="N",
                   help="also average each view shifted N pixels up, down, left and right, "
                        "at half weight (0: off; at most 4)")
    _engine_args(s)


def _data_args(s: argparse.ArgumentParser, when: str = "") -> None:
    s.add_argument("--dataset", default="fashion-mnist",
                   help=f"fashion-mnist, idx:DIR, cifar:DIR or folder:DIR{when}")
    s.add_argument("--data-dir", default=None, help=f"folder of the dataset's files{when}")


def _runtime_args(sub) -> None:
    s = _verb(sub, "predict", "top-k classes for image files or folders")
    s.add_argument("checkpoint", help="a .safetensors file, a run folder or an exported .onnx")
    s.add_argument("images", nargs="+", help="image files or folders of them")
    s.add_argument("--top-k", type=int, default=5, help="classes to show per image")
    _engine_args(s)

    s = _verb(sub, "bench", "side-by-side throughput against plain PyTorch")
    s.add_argument("model", nargs="?", default="resnet50", help="preset name")
    s.add_argument("--batch", type=int, default=16, help="images per batch")
    s.add_argument("--image-size", type=int, default=224, help="input side in pixels")
    s.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    s.add_argument("--rounds", type=int, default=7, help="timed rounds of every path")
    s.add_argument("--in-chans", type=int, default=3, help="input channels")
    s.add_argument("--num-classes", type=int, default=1000, help="classifier outputs")
    s.add_argument("--no-train", action="store_true", help="skip the training-step paths")
    s.add_argument("--no-onnx", action="store_true",
                   help="skip the engines that run the exported ONNX file (ONNX Runtime, OpenVINO)")
    s.add_argument("--no-int8", action="store_true",
                   help="skip the int8 paths (resnetkit's PT2E int8, ONNX Runtime on its QDQ "
                        "export, OpenVINO with NNCF); with --check they calibrate on 512 "
                        "training images")
    s.add_argument("--compile", action="store_true",
                   help="also time torch.compile of the fast path (always timed where "
                        "optimize() compiles by default: CUDA, or a CPU with a C++ compiler)")
    s.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu, cuda[:N]")
    s.add_argument("--peer-search", default="search", choices=["search", "defaults"],
                   help="search: time each peer engine's configurations first (ONNX exporter, "
                        "static or dynamic batch, engine and quantizer options) and race the "
                        "fastest (default); defaults: their default configuration, untimed")
    s.add_argument("--check", metavar="CHECKPOINT", default=None,
                   help="instead of timing: compare every fast path's logits with fp32 on a "
                        "real test set for this trained checkpoint or run folder")
    _data_args(s, " (with --check)")
    s.add_argument("--limit", type=int, default=0, help="with --check: first N test images")

    s = _verb(sub, "export", "ONNX, TorchScript or ExportedProgram, dynamic batch and size",
              json=False)
    s.add_argument("source", help="checkpoint (.safetensors or run folder) or preset name")
    s.add_argument("overrides", nargs="*", help="config overrides for a preset, key=value")
    s.add_argument("--format", default="onnx", choices=["onnx", "torchscript", "exported-program"],
                   help="file format")
    s.add_argument("-o", "--output", default=None, help="output file (default SOURCE.FORMAT)")
    s.add_argument("--image-size", type=int, default=0,
                   help="the size traced at; default: the checkpoint's, or the preset's (224, 32)")
    s.add_argument("--no-fold", action="store_true", help="keep BN layers unfolded")
    s.add_argument("--dynamic-size", action=argparse.BooleanOptionalAction, default=True,
                   help="the file takes any height and width (default); --no-dynamic-size "
                        "fixes them at --image-size")
    s.add_argument("--opset", type=int, default=None,
                   help="ONNX opset to write (18 or later; default: the exporter's)")
    s.add_argument("--precision", default="fp32", choices=["fp32", "int8"],
                   help="int8: a QDQ ONNX file quantized on --calibration (and an OpenVINO "
                        "IR beside it where OpenVINO is installed); see `resnetkit quantize`")
    s.add_argument("--calibration", default=None, metavar="DATASET[:N]",
                   help="with --precision int8: N training images of this dataset "
                        "(default 512) in the checkpoint's preprocessing")
    s.add_argument("--data-dir", default=None, help="folder of the calibration dataset's files")


def _serve_args(sub) -> None:
    s = _verb(sub, "serve", "HTTP server with dynamic batching, a page to try the model, "
                            "metrics", json=False)
    s.add_argument("model", nargs="?", default=None,
                   help="a run folder, .safetensors checkpoint, weights tag or exported .onnx "
                        "file (or give --model-repository DIR instead)")
    _serve_fields(s)


def _serve_fields(s: argparse.ArgumentParser) -> None:
    """Every ServeConfig field as --field-with-dashes, its help, type and choices."""
    from .serve.config import ServeConfig
    for f in dataclasses.fields(ServeConfig):
        flag = f"--{f.name.replace('_', '-')}"
        if str(f.type) == "bool":
            s.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, action="store_true",
                           help=f.metadata["help"])
            continue
        kind = {"int": int, "float": float}.get(str(f.type).split(" |")[0], str)
        choices = f.metadata["choices"]  # checked by ServeConfig, in one sentence
        default = "" if f.default is dataclasses.MISSING else f" (default: {f.default!r})"
        s.add_argument(flag, dest=f.name, default=argparse.SUPPRESS,
                       type=kind, metavar="|".join(choices) if choices else None,
                       help=f"{f.metadata['help']}{default}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="resnetkit", description=DESCRIPTION)
    sub = p.add_subparsers(dest="command", required=True)
    s = _verb(sub, "models", "list the presets")
    s.add_argument("pattern", nargs="?", default="*", help="shell pattern, e.g. 'resnext*'")
    _verb_args(sub)
    _runtime_args(sub)
    _serve_args(sub)
    _quantize_args(sub)
    _experiment_args(sub)
    s = _verb(sub, "explain", "what a trained model looks at: Grad-CAM, integrated gradients "
                              "or occlusion over each image, with its top-3 classes")
    s.add_argument("source", help="a checkpoint, run folder, weights tag or foreign weights file "
                                  "(something with gradients: not an .onnx or .xml file)")
    s.add_argument("images", nargs="+", help="image files or folders of them")
    s.add_argument("--method", default="gradcam",
                   choices=["gradcam", "integrated-gradients", "occlusion"], help="attribution")
    s.add_argument("--layer", default=None,
                   help="gradcam: a stage or block as named in the model (layer3, layer3.1); "
                        "default: the last stage")
    s.add_argument("--target", type=int, default=None,
                   help="class index to explain (default: each image's predicted class)")
    s.add_argument("-o", "--output", required=True, help="the figure, a .png file")
    _verb(sub, "recipes", "list the shipped training recipes", json=False)
    s = _verb(sub, "weights", "published weights: list, download, convert to a checkpoint")
    s.add_argument("action", choices=["list", "download", "convert"], help="what to do")
    s.add_argument("target", nargs="?", help="list: a tag pattern; download: a TAG; convert: "
                   "a TAG or a torchvision/timm/Paddle weights file")
    s.add_argument("-o", "--output", help="convert: the .safetensors to write")
    return p




def _engine_args(s: argparse.ArgumentParser) -> None:
    """--engine, --precision and --calibration of `eval` and `predict`."""
    s.add_argument("--engine", default=None,
                   choices=["torch", "onnxruntime", "openvino", "auto"],
                   help="run on this engine (auto: the one measured fastest here, timed once "
                        "and cached); default: plain PyTorch for a checkpoint, ONNX Runtime "
                        "for .onnx, OpenVINO for .xml")
    s.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "int8"],
                   help="with --engine on a checkpoint: auto (bf16 where the CPU has it, else "
                        "fp32; never int8) or int8 with --calibration")
    s.add_argument("--calibration", default=None, metavar="DATASET[:N]",
                   help="with --precision int8: N training images of this dataset (default "
                        "512) in the checkpoint's preprocessing")


def _quantize_args(sub) -> None:
    s = _verb(sub, "quantize", "post-training int8: QDQ ONNX and OpenVINO IR files")
    s.add_argument("source", help="a trained checkpoint: .safetensors, run folder or weights tag")
    s.add_argument("--calibration", required=True, metavar="DATASET[:N]",
                   help="N training images of this dataset (default 512), e.g. "
                        "fashion-mnist:1000, read in the checkpoint's own preprocessing")
    s.add_argument("--data-dir", default=None, help="folder of the calibration dataset's files")
    s.add_argument("-o", "--output", required=True,
                   help="NAME.onnx (QDQ ONNX, plus NAME.xml/.bin where OpenVINO and NNCF are "
                        "installed) or NAME.xml (OpenVINO IR only)")


def _experiment_args(sub) -> None:
    s = _verb(sub, "experiment", "the ResNet paper's experiments: degradation, responses",
              json=False)
    kinds = s.add_subparsers(dest="experiment", required=True, help="which experiment")
    d = kinds.add_parser("degradation", allow_abbrev=False,
                         help="plain nets and ResNets of several depths, one recipe: training "
                              "and test error per epoch (the paper's figure 6)")
    d.add_argument("--models", default="plain20,plain56,resnet20,resnet56",
                   help="comma-separated presets (default: plain20,plain56,resnet20,resnet56)")
    d.add_argument("--out", default="degradation",
                   help="folder of results.json, degradation.png and one run per model; "
                        "running the same command again continues it")
    d.add_argument("--recipe", default=None, help="recipe name or .toml path")
    _train_fields(d)
    r = kinds.add_parser("responses", allow_abbrev=False,
                         help="std of every 3x3 layer's response after BN (the paper's "
                              "figure 7) for trained runs")
    r.add_argument("runs", nargs="+", help="run folders or checkpoints")
    r.add_argument("--out", default="responses", help="folder of responses.json and .png")
    r.add_argument("--dataset", default=None, help="test set (default: each run's own)")
    r.add_argument("--data-dir", default=None, help="folder of the dataset's files")
    r.add_argument("--limit", type=int, default=0, help="first N test images (0: all)")
