"""bench: the JSON figures and bad input (timings themselves are not asserted)."""
import pytest
import torch

from resnetkit.bench import bench, hardware
from resnetkit.errors import UserError
from resnetkit.infer.backends.openvino import precisions as openvino_precisions
from resnetkit.infer.backends.onednn import unavailable as direct_unavailable
from resnetkit.infer.optimize import compile_pays


@pytest.mark.slow
def test_bench_reports_the_int8_paths():
    r = bench("resnet20", batch=4, image_size=32, rounds=2, warmup=1, in_chans=3, num_classes=10,
              train=False)
    res = r["results"]
    assert {"resnetkit_int8", "onnxruntime_int8", "openvino_int8"} <= set(res)
    assert all(res[k]["precision"] == "int8" for k in res if k.endswith("int8"))
    assert all(v["fraction_of_peak"] <= 1 for v in res.values())


def test_bench_small_model_reports_every_path(monkeypatch):
    # the int8 paths (compiled per shape, tens of seconds) are in the slow test above;
    # `bench --check` in CI covers them on a trained model. The compiled training step (tens
    # of seconds more) is left out here: test_train_step covers it.
    # the peers in their defaults: the configuration search is tested in test_peers
    monkeypatch.setattr("resnetkit.bench.can_compile", lambda device: False)
    r = bench("resnet20", batch=4, image_size=32, rounds=2, warmup=1, in_chans=3, num_classes=10,
              int8=False, peer_search="defaults")
    res = r["results"]
    assert {"baseline_fp32_nchw", "resnetkit_infer", "onnxruntime_fp32",
            "train_baseline_fp32_nchw", "train_resnetkit"} <= set(res)
    engines = {f"openvino_{p}" for p in openvino_precisions()}
    assert engines and engines <= set(res)  # OpenVINO is part of the [all] install
    assert all(res[k]["precision"] == k.split("_")[1] for k in engines)
    assert set(r["peers"]) == engines | {"onnxruntime_fp32"} and r["peer_search"] == "defaults"
    assert all(p["config"]["exporter"] == "dynamo" and p["config"]["shape"] == "static"
               and p["tried"] == [] for p in r["peers"].values())
    assert r["peers"]["onnxruntime_fp32"]["config"]["level"] == "all"
    hw = r["hardware"]
    assert hw["peak_source"] and hw["peak_int8_gops"] >= hw["peak_fp32_gflops"]
    assert all(v["fraction_of_peak"] <= 1 for v in res.values())  # a true peak
    assert res["baseline_fp32_nchw"]["speedup"] == 1.0
    assert r["allocator"]["allocator"] in ("glibc-tuned", "system")
    for v in res.values():
        assert v["img_s"] > 0 and v["min_ms"] <= v["ms_per_batch"] <= v["max_ms"]
        assert v["img_s"] == pytest.approx(4 / (v["ms_per_batch"] / 1e3))
        assert len(v["round_ms"]) == 2 and min(v["round_ms"]) == v["min_ms"]
    for k, v in res.items():  # the per-round ratio's median (of two rounds: their mean)
        ref = res["train_baseline_fp32_nchw" if k.startswith("train") else "baseline_fp32_nchw"]
        paired = [a / b for a, b in zip(ref["round_ms"], v["round_ms"])]
        assert v["speedup_paired"] == pytest.approx(sum(paired) / 2)
    # ResNet-20 at 32x32 by hand: stem, 3 stages of 6 3x3 convs (option A: no shortcut convs), fc
    macs = (3 * 16 * 9 * 32 ** 2 + 6 * 16 * 16 * 9 * 32 ** 2
            + (16 * 32 + 5 * 32 * 32) * 9 * 16 ** 2 + (32 * 64 + 5 * 64 * 64) * 9 * 8 ** 2 + 64 * 10)
    assert r["macs_per_image"] == macs
    t = r["train_targets"]
    assert t["path"] == "train_resnetkit" and r["train_compile_s"] is None
    assert t["speedup_paired"] == res["train_resnetkit"]["speedup_paired"]
    assert t["speedup_target"] == (2.5 if hw["avx512_bf16"] or hw["amx_bf16"] else 1.5)
    assert t["fraction_of_peak_target"] == (None if hw["amx_bf16"] else 0.6)


def test_train_targets_follow_the_cpu():
    from resnetkit.bench import _train_targets
    res = {"train_resnetkit": {"speedup_paired": 2.0, "fraction_of_peak": 0.62},
           "train_resnetkit_compiled": {"speedup_paired": 2.6, "fraction_of_peak": 0.5}}
    cpu = {"peak_int8_gops": 1.0}
    t = _train_targets(res, {**cpu, "avx512_bf16": True, "amx_bf16": False})
    assert (t["path"], t["speedup_target"], t["speedup_met"]) == ("train_resnetkit_compiled", 2.5, True)
    assert (t["fraction_of_peak_target"], t["fraction_of_peak_met"]) == (0.6, False)
    t = _train_targets(res, {**cpu, "avx512_bf16": False, "amx_bf16": False})
    assert t["speedup_target"] == 1.5 and t["speedup_met"]
    t = _train_targets(res, {**cpu, "avx512_bf16": True, "amx_bf16": True})
    assert t["fraction_of_peak_target"] is None and t["fraction_of_peak_met"] is None
    t = _train_targets(res, {"peak_bf16_gflops": 1.0})  # CUDA: no targets
    assert t["speedup_target"] is None and t["speedup_met"] is None


@pytest.mark.parametrize("kw,msg", [({"batch": 0}, "batch size must be >= 1"),
                                    ({"threads": -1}, "thread count"),
                                    ({"image_size": 0, "model": "resnet50"}, "too small"),
                                    ({"peer_search": "all"}, "peer_search must be one of")])
def test_bench_bad_input(kw, msg):
    args = {"model": "resnet20", "batch": 2, "image_size": 32, "rounds": 1, **kw}
    if args["model"] == "resnet20":
        args["num_classes"] = 10
    with pytest.raises(UserError, match=msg):
        bench(**args)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
def test_bench_cuda_without_gpu_is_refused():
    with pytest.raises(UserError, match="no CUDA device"):
        bench("resnet20", batch=2, image_size=32, rounds=1, num_classes=10, device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bench_on_gpu():
    r = bench("resnet20", batch=64, image_size=32, rounds=3, num_classes=10, device="cuda")
    res = r["results"]
    assert {"baseline_fp32_nchw", "resnetkit_infer", "resnetkit_infer_compiled",
            "train_baseline_fp32_nchw", "train_resnetkit"} <= set(res)
    assert "onnxruntime_fp32" not in res and r["hardware"]["device"] == torch.cuda.get_device_name()
    assert all(v["img_s"] > 0 for v in res.values())


def test_hardware_peak_is_derived():
    hw = hardware()
    assert hw["threads"] >= 1
    if hw.get("ghz"):
        assert hw["peak_fp32_gflops"] > 0


def test_check_compares_every_fast_path_with_fp32(trained, capsys):
    import json

    from resnetkit.bench import check
    from resnetkit.cli import main
    from resnetkit.data import load_dataset
    from resnetkit.weights import load_model
    from resnetkit.evaluate import evaluate
    r = check(trained, limit=2000)
    res = r["results"]
    engines = {f"openvino_{p}" for p in openvino_precisions()}
    if compile_pays(torch.device("cpu")):  # optimize() compiles by default here
        engines.add("resnetkit_infer_compiled")
    engines |= {"resnetkit_int8", "onnxruntime_int8", "openvino_int8"}
    if direct_unavailable() is None:  # the direct oneDNN path, and PT2E's int8 beside it
        engines |= {"resnetkit_direct", "resnetkit_int8_pt2e"}
    assert r["samples"] == 2000 and set(res) == {"baseline_fp32_nchw", "resnetkit_infer",
                                                 "onnxruntime_fp32"} | engines
    base = res["baseline_fp32_nchw"]
    assert base["agreement_with_fp32"] == 1 and base["max_abs_diff"] == 0
    # The fp32 top-1 equals the trainer's own evaluation of the same checkpoint and images.
    model, info = load_model(trained)
    d = load_dataset("fashion-mnist", "test")
    from resnetkit.data import ArrayDataset
    sub = ArrayDataset(d.images[:2000], d.labels[:2000], d.classes, d.mean, d.std)
    ev = evaluate(model, sub, info["preprocess"]["mean"], info["preprocess"]["std"])
    assert base["top1"] == pytest.approx(ev["top1"], abs=1e-9) and base["top1"] > 0.6
    onnx = res["onnxruntime_fp32"]  # fp32 with BN folded: rounding only
    assert onnx["agreement_with_fp32"] >= 0.999 and onnx["max_abs_diff"] <= 1e-4 * max(1, r["logit_scale"])
    if "openvino_fp32" in res:
        ov = res["openvino_fp32"]
        assert ov["agreement_with_fp32"] >= 0.999 and ov["max_abs_diff"] <= 1e-4 * max(1, r["logit_scale"])
    if "openvino_bf16" in res:
        ov = res["openvino_bf16"]
        assert ov["agreement_with_fp32"] >= 0.99 and abs(ov["top1"] - base["top1"]) <= 0.01
    for k in ("resnetkit_infer_compiled", "resnetkit_direct"):
        if k in res:
            comp = res[k]
            assert comp["agreement_with_fp32"] >= 0.99 and abs(comp["top1"] - base["top1"]) <= 0.01
    # calibrated on train
    for k in ("resnetkit_int8", "resnetkit_int8_pt2e", "onnxruntime_int8", "openvino_int8"):
        if k not in res and k == "resnetkit_int8_pt2e":
            continue
        q = res[k]
        assert q["precision"] == "int8" and q["agreement_with_fp32"] >= 0.97, (k, q)
        assert abs(q["top1"] - base["top1"]) <= 0.02 and q["max_abs_diff"] < 0.25 * r["logit_scale"]
    fast = res["resnetkit_infer"]  # bf16 where native: small differences, same classes
    assert fast["agreement_with_fp32"] >= 0.99 and fast["max_abs_diff"] < 0.1 * r["logit_scale"]
    assert abs(fast["top1"] - base["top1"]) <= 0.01
    assert main(["bench", "--check", str(trained), "--limit", "300", "--no-onnx", "--no-int8",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["samples"] == 300 and set(out["results"]) - {"resnetkit_infer_compiled",
                                                             "resnetkit_direct"} == {
        "baseline_fp32_nchw", "resnetkit_infer"}


def test_check_bad_input(trained, tmp_path):
    from resnetkit.bench import check
    with pytest.raises(UserError, match="batch size must be >= 1"):
        check(trained, batch=0)
    with pytest.raises(UserError):
        check(tmp_path / "missing.safetensors")


def test_a_failing_peer_engine_is_dropped_with_a_note(monkeypatch):
    from resnetkit.bench import _working
    calls = []

    def broken(x):
        raise RuntimeError("Exception from plugin.cpp:1:\n[CPU] node is not initialized\n")
    paths = {"openvino_fp32": ("fp32", broken), "onnxruntime_fp32": ("fp32", calls.append),
             "resnetkit_int8": ("int8", broken)}
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    notes = []
    ok = _working(paths, "probe", notes)
    assert list(ok) == ["onnxruntime_fp32", "resnetkit_int8"] and calls == ["probe"]
    assert notes == ["openvino_fp32 skipped: it failed on this machine with "
                     "ONEDNN_MAX_CPU_ISA=AVX2 ([CPU] node is not initialized)"]
    # and one that fails to build (OpenVINO's compile_model under that cap)
    pytest.importorskip("openvino")
    import resnetkit.infer.backends.openvino as openvino

    def no_build(*a, **k):
        raise RuntimeError("Check failed:\nSupported primitive descriptors list is empty")
    monkeypatch.setattr(openvino, "compiled", no_build)
    from resnetkit.bench import _peers
    notes = []
    from resnetkit import create_model
    runners, table = _peers(create_model("resnet20", num_classes=3).eval(), (2, 3, 32, 32),
                            None, notes, mode="defaults")
    assert set(runners) == set(table) == {"onnxruntime_fp32"} and all(
        n.endswith("(Supported primitive descriptors list is empty)") for n in notes) and notes


@pytest.fixture
def own_rng():
    """The global RNG as it was before the test (loading a checkpoint draws from it)."""
    with torch.random.fork_rng():
        yield


def test_check_refuses_weights_whose_outputs_overflow(tmp_path, capsys, own_rng):
    from test_infer import tiny_checkpoint

    from resnetkit.bench import check
    from resnetkit.cli import main
    w = tiny_checkpoint(tmp_path / "huge.safetensors", 1e6)
    with pytest.raises(UserError, match=r"huge.safetensors \(baseline_fp32_nchw\) produced NaN "
                                        r"or infinite outputs on image 0 of fashion-mnist test"):
        check(w, onnx=False, int8=False, limit=64)
    # torchao's first import writes its own notes to stderr (a kernel library it could not
    # load, a deprecation): done here first, so that what is read below is resnetkit's alone
    pytest.importorskip("torchao.quantization.pt2e.quantize_pt2e")
    capsys.readouterr()
    # int8 is calibrated first: its calibration sees the same outputs
    assert main(["bench", "--check", str(w), "--limit", "64", "--no-onnx"]) == 2
    err = capsys.readouterr().err
    assert "huge.safetensors produced NaN or infinite outputs on calibration image 0" in err
    assert err.count("\n") == 1


def test_inference_targets_pair_resnetkit_with_the_fastest_peer_of_its_precision():
    from resnetkit.bench import _inference_targets

    def row(prec, ms, frac=0.5):
        return {"precision": prec, "round_ms": ms, "img_s": 1e3 / ms[0],
                "fraction_of_peak": frac}
    res = {"resnetkit_infer": row("bf16", [10, 10, 10]),
           "resnetkit_infer_compiled": row("bf16", [8, 9, 10], 0.95),
           "openvino_bf16": row("bf16", [9, 9, 9]), "openvino_fp32": row("fp32", [1, 1, 1]),
           "resnetkit_int8": row("int8", [4, 4, 4]), "openvino_int8": row("int8", [5, 5, 5]),
           "onnxruntime_int8": row("int8", [2, 8, 8])}  # faster by its median only
    t = _inference_targets(res, {"peak_int8_gops": 1.0, "amx_bf16": False})
    d = t["default"]
    assert (d["path"], d["best_peer"]) == ("resnetkit_infer_compiled", "openvino_bf16")
    assert d["ratio_paired"] == pytest.approx(1.0) and d["ratio_met"]  # 9/8, 9/9, 9/10
    assert d["fraction_of_peak_met"] and d["fraction_of_peak_target"] == 0.9
    i = t["int8"]
    assert i["best_peer"] == "onnxruntime_int8" and i["ratio_paired"] == 2.0
    assert not i["fraction_of_peak_met"]
    t = _inference_targets({"resnetkit_infer": row("fp32", [1])}, {"amx_bf16": True})
    assert t["default"]["best_peer"] is None and t["default"]["ratio_met"] is None
    assert t["default"]["fraction_of_peak_target"] is None and "int8" not in t
    # capped at AVX2, ONNX Runtime (which ignores the cap) is left out of the comparison
    t = _inference_targets(res, {"peak_int8_gops": 1.0, "amx_bf16": False}, capped=True)
    assert t["int8"]["best_peer"] == "openvino_int8" and t["int8"]["ratio_paired"] == 1.25
    assert "onnxruntime" in t["int8"]["left_out"] and "left_out" not in i


def test_without_torchao_the_peers_skip_only_what_needs_it(monkeypatch):
    import resnetkit.bench as b
    from resnetkit.infer.peers import PeerConfig, Peer

    def installed(engine, precision):
        return "int8 with torch needs torchao" if (engine, precision) == ("torch", "int8") \
            else None
    asked = []

    def best_peer(engine, prec, files, batches, mode, rounds, static):
        asked.append((engine, prec, mode))
        return Peer(PeerConfig(engine, prec), lambda a: a)
    monkeypatch.setattr(b, "installed", installed)
    monkeypatch.setattr(b, "best_peer", best_peer)
    model = b.create_model("resnet20", num_classes=3).eval()
    batches = [torch.randn(4, 3, 32, 32)]
    notes = []
    assert b._int8_path(model, batches, notes) == {}
    assert notes == ["int8 with torch needs torchao: resnetkit_int8 skipped"]
    notes = []
    runners, _ = b._peers(model, (4, 3, 32, 32), batches, notes, mode="defaults")
    # the check's default ORT int8 is resnetkit's PT2E file: skipped; OpenVINO's is NNCF's
    assert ("onnxruntime", "int8", "defaults") not in asked and "openvino_int8" in runners
    assert notes == ["int8 with torch needs torchao: onnxruntime_int8 skipped"]
    asked.clear()
    runners, _ = b._peers(model, (4, 3, 32, 32), batches, [], mode="search")
    assert ("onnxruntime", "int8", "search") in asked  # ORT's own quantizer needs no torchao
