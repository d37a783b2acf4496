"""bench's OpenVINO against OpenVINO set up plainly, in one process, interleaved round by round.

The plain setup is what a user following OpenVINO's and NNCF's getting-started guides writes:
the TorchScript ONNX exporter at a static shape, `nncf.quantize` with its defaults on a few
calibration batches (int8), the LATENCY hint, as many threads as torch uses, its own
`openvino.Core`. bench's is the configuration its search chooses (infer.peers). Prints JSON:
both img/s (medians), their ratio, bench's configuration and its search table.

    python benchmarks/peer_plain.py [--model resnet50] [--batch 16] [--image-size 224]
                                    [--precision int8] [--rounds 9] [--calibration-batches 4]
"""
from __future__ import annotations

import contextlib
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

import resnetkit as rk
from common import model_parser
from resnetkit.infer.backends.openvino import nncf_to_stderr
from resnetkit.infer.peers import Files, best_peer
from resnetkit.infer.timing import interleaved
from resnetkit.runtime import cpu_info


def plain(model: torch.nn.Module, shape: tuple[int, ...], precision: str,
          batches: list[torch.Tensor], work: Path):
    import nncf
    import openvino as ov
    path = work / "plain.onnx"
    torch.onnx.export(model, (torch.randn(shape),), str(path), dynamo=False,
                      input_names=["input"], output_names=["logits"])
    core = ov.Core()
    graph = core.read_model(str(path))
    if precision == "int8":
        with contextlib.redirect_stdout(sys.stderr), nncf_to_stderr():  # its progress and logs
            graph = nncf.quantize(graph, nncf.Dataset([b.numpy() for b in batches]))
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": torch.get_num_threads()}
    if precision in ("fp32", "bf16"):
        config["INFERENCE_PRECISION_HINT"] = "f32" if precision == "fp32" else "bf16"
    request = core.compile_model(graph, "CPU", config).create_infer_request()
    return lambda x: request.infer({0: x}, share_inputs=True)


def main() -> None:
    p = model_parser(__doc__)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--calibration-batches", type=int, default=4)
    a = p.parse_args()
    rk.tune_allocator()  # as the CLI does
    torch.manual_seed(0)
    model = rk.create_model(a.model, num_classes=a.num_classes).eval()
    shape = (a.batch, 3, a.image_size, a.image_size)
    batches = [torch.randn(shape) for _ in range(a.calibration_batches)]
    with tempfile.TemporaryDirectory() as work:
        files = Files(model, shape)
        try:
            peer = best_peer("openvino", a.precision, files,
                             batches if a.precision == "int8" else None)
        finally:
            files.close()
        run_plain = plain(model, shape, a.precision, batches, Path(work))
        x = torch.randn(shape).numpy()
        times = interleaved({"bench": lambda: peer.run(x), "plain": lambda: run_plain(x)},
                            a.rounds, warmup=2)
    img_s = {k: a.batch / statistics.median(v) for k, v in times.items()}
    paired = statistics.median(p / b for b, p in zip(times["bench"], times["plain"]))
    print(json.dumps({
        "model": a.model, "batch": a.batch, "image_size": a.image_size,
        "precision": a.precision, "cpu": cpu_info()["name"], "threads": torch.get_num_threads(),
        "img_s": img_s, "bench_over_plain": img_s["bench"] / img_s["plain"],
        "bench_over_plain_paired": paired, "round_ms": {k: [t * 1e3 for t in v]
                                                       for k, v in times.items()},
        "bench_config": peer.config.describe(), "search": peer.tried}, indent=1))


if __name__ == "__main__":
    main()
