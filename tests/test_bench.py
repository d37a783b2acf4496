"""bench: the JSON figures and bad input (timings themselves are not asserted)."""
import pytest

from resnetkit.bench import bench, hardware
from resnetkit.errors import UserError


def test_bench_small_model_reports_every_path():
    r = bench("resnet20", batch=4, image_size=32, rounds=2, warmup=1, in_chans=3, num_classes=10)
    res = r["results"]
    assert {"baseline_fp32_nchw", "resnetkit_infer", "onnxruntime_fp32",
            "train_baseline_fp32_nchw", "train_resnetkit"} <= set(res)
    assert res["baseline_fp32_nchw"]["speedup"] == 1.0
    for v in res.values():
        assert v["img_s"] > 0 and v["min_ms"] <= v["ms_per_batch"] <= v["max_ms"]
        assert v["img_s"] == pytest.approx(4 / (v["ms_per_batch"] / 1e3))
    # ResNet-20 at 32x32 by hand: stem, 3 stages of 6 3x3 convs (option A: no shortcut convs), fc
    macs = (3 * 16 * 9 * 32 ** 2 + 6 * 16 * 16 * 9 * 32 ** 2
            + (16 * 32 + 5 * 32 * 32) * 9 * 16 ** 2 + (32 * 64 + 5 * 64 * 64) * 9 * 8 ** 2 + 64 * 10)
    assert r["macs_per_image"] == macs


@pytest.mark.parametrize("kw,msg", [({"batch": 0}, "batch size must be >= 1"),
                                    ({"threads": -1}, "thread count"),
                                    ({"image_size": 0, "model": "resnet50"}, "too small")])
def test_bench_bad_input(kw, msg):
    args = {"model": "resnet20", "batch": 2, "image_size": 32, "rounds": 1, **kw}
    if args["model"] == "resnet20":
        args["num_classes"] = 10
    with pytest.raises(UserError, match=msg):
        bench(**args)


def test_hardware_peak_is_derived():
    hw = hardware()
    assert hw["threads"] >= 1
    if hw.get("ghz"):
        assert hw["peak_fp32_gflops"] > 0
