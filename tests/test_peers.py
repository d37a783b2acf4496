"""The peer engines' configuration search (infer.peers): its stages and choice against made-up
speeds, and real builds of its configurations against the PyTorch model's own outputs."""
import numpy as np
import onnx
import pytest
import torch

import resnetkit as rk
from conftest import with_bn_stats
from resnetkit.errors import UserError
from resnetkit.infer import peers
from resnetkit.infer.export import export
from resnetkit.infer.peers import Files, PeerConfig, best_peer, default_config, rebatch

pytestmark = pytest.mark.xdist_group("test_peers")
SHAPE = (4, 3, 16, 16)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return with_bn_stats(rk.create_model("resnet20", num_classes=10)).eval()


@pytest.fixture(scope="module")
def files(model):
    f = Files(model, SHAPE)
    yield f
    f.close()


def fake_speeds(monkeypatch, speed, fail=()):
    """build() gives a function that records its config; the timer reports `speed(config)`
    img/s instead of timing; configs in `fail` raise as an engine would."""
    built = []

    def build(cfg, files, batches, threads):
        built.append(cfg)
        if cfg in fail:
            raise RuntimeError("Exception from the plugin:\n[CPU] cannot build it")
        return lambda x: np.zeros((len(x), 10), np.float32)

    def interleaved(calls, rounds, warmup=1, lead_in=None):
        return {label: label for label in calls}  # the label, for per_second below

    by_label = {}
    monkeypatch.setattr(peers, "build", build)
    monkeypatch.setattr(peers, "interleaved", interleaved)
    monkeypatch.setattr(peers, "per_second", lambda times, n: {
        k: speed(by_label.setdefault(k, next(c for c in built if c.label() == k)))
        for k in times})
    return built


def test_the_search_keeps_the_fastest_in_two_stages(monkeypatch, files):
    def speed(cfg):  # a TorchScript file with a dynamic batch and THROUGHPUT wins
        o = dict(cfg.options)
        return 100 + 10 * (cfg.exporter == "torchscript") + 5 * (cfg.shape == "dynamic") \
            + 50 * (o["hint"] == "THROUGHPUT")
    built = fake_speeds(monkeypatch, speed)
    p = best_peer("openvino", "fp32", files, None, rounds=1)
    assert p.config.describe() == {"exporter": "torchscript", "shape": "dynamic",
                                   "hint": "THROUGHPUT"}
    # stage one: the four files with the defaults; stage two: the leader (not rebuilt)
    # beside each variant of one option
    assert [(c.exporter, c.shape) for c in built[:4]] == [
        ("dynamo", "static"), ("dynamo", "dynamic"), ("torchscript", "static"),
        ("torchscript", "dynamic")]
    assert built[4:] == [p.config] and len(built) == 5
    assert [r["img_s"] for r in p.tried] == [100, 105, 110, 115, 115, 165]
    assert p.tried[4]["config"] == p.tried[3]["config"]  # the leader, timed again


def test_failed_configurations_are_rows_and_all_failing_raises(monkeypatch, files):
    bad = PeerConfig("onnxruntime", "fp32", "dynamo", "static", (("level", "all"),))
    fake_speeds(monkeypatch, lambda c: 10.0 if c.exporter == "dynamo" else 20.0, fail=(bad,))
    p = best_peer("onnxruntime", "fp32", files, None)
    assert p.config.exporter == "torchscript"
    assert p.tried[0] == {"config": bad.describe(), "error": "[CPU] cannot build it"}
    levels = [r["config"]["level"] for r in p.tried[4:]]
    assert levels == ["all", "extended", "basic"]
    # the quantizers: resnetkit's own QDQ file first, then ORT's on each exported file
    fake_speeds(monkeypatch, lambda c: 1.0 + (c.get("format") == "qoperator"))
    p = best_peer("onnxruntime", "int8", files, [torch.randn(SHAPE)])
    q = [(r["config"]["quantizer"], r["config"]["shape"]) for r in p.tried[:5]]
    assert q == [("pt2e", "dynamic"), ("ort", "static"), ("ort", "dynamic"), ("ort", "static"),
                 ("ort", "dynamic")]
    assert p.config.get("format") == "qoperator"
    # OpenVINO int8's variants: the float ops at bf16 only where the CPU offers bf16
    from resnetkit.infer.backends.openvino import precisions
    fake_speeds(monkeypatch, lambda c: 1.0)
    p = best_peer("openvino", "int8", files, [torch.randn(SHAPE)])
    variants = [r["config"] for r in p.tried[5:]]
    assert [v["float_ops"] for v in variants].count("bf16") == ("bf16" in precisions())
    assert {v["hint"] for v in variants} == {"LATENCY", "THROUGHPUT"}
    everything = default_config("openvino", "int8", True)
    monkeypatch.setattr(peers, "build", lambda *a: (_ for _ in ()).throw(RuntimeError("no\nAMX")))
    with pytest.raises(RuntimeError, match="^AMX$"):
        best_peer(everything.engine, everything.precision, files, [torch.randn(SHAPE)])
    with pytest.raises(UserError, match="peer search is one of"):
        best_peer("openvino", "fp32", files, None, mode="fastest")


def test_rebatch_gives_whole_batches_of_the_files_size():
    b = [torch.arange(5.0).view(5, 1, 1, 1), torch.arange(5.0, 12).view(7, 1, 1, 1)]
    got = rebatch(b, 4)
    assert [len(x) for x in got] == [4, 4, 4] and torch.equal(torch.cat(got).flatten(),
                                                              torch.arange(12.0))
    assert [len(x) for x in rebatch(b, 16)] == [12]


def test_exporters_and_fixed_batches(tmp_path, model, files):
    for exporter in ("dynamo", "torchscript"):  # the files the tests here share
        dims = onnx.load(files.onnx(exporter, "static")).graph.input[0].type.tensor_type.shape.dim
        assert [d.dim_value for d in dims] == list(SHAPE)
        dims = onnx.load(files.onnx(exporter, "dynamic")).graph.input[0].type.tensor_type.shape.dim
        assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [3, 16, 16]
    with pytest.raises(UserError, match="unknown ONNX exporter"):
        export(model, tmp_path / "x.onnx", "onnx", 16, exporter="jit")
    with pytest.raises(UserError, match="fixed batch size is for ONNX files of a fixed"):
        export(model, tmp_path / "x.onnx", "onnx", 16, batch=4)


@pytest.mark.parametrize("cfg", [
    PeerConfig("onnxruntime", "fp32", "torchscript", "static", (("level", "basic"),)),
    PeerConfig("openvino", "fp32", "dynamo", "dynamic", (("hint", "THROUGHPUT"),)),
], ids=lambda c: c.label())
def test_fp32_configurations_compute_the_models_function(cfg, files, model):
    pytest.importorskip(cfg.engine)
    x = torch.randn(SHAPE)
    got = peers.build(cfg, files, None, 2)(x.numpy())
    with torch.no_grad():
        want = model(x)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("fmt", ["qdq", "qoperator"])
def test_onnxruntimes_own_int8_follows_the_model(fmt, files, model):
    # random weights, so the check is the logits' correlation with fp32's, not accuracy
    # (that is bench --check's, on a trained model)
    torch.manual_seed(1)
    cal = [torch.randn(8, *SHAPE[1:]) for _ in range(2)]
    cfg = PeerConfig("onnxruntime", "int8", "dynamo", "static",
                     (("quantizer", "ort"), ("format", fmt), ("level", "all")))
    x = torch.randn(SHAPE)
    got = peers.build(cfg, files, cal, 2)(x.numpy())
    path = files.work / f"ort-{fmt}-dynamo-static.onnx"
    ops = {n.op_type for n in onnx.load(path).graph.node}
    assert ("QLinearConv" in ops) == (fmt == "qoperator") and ("QuantizeLinear" in ops)
    with torch.no_grad():
        want = model(x).numpy()
    assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.95
    assert not np.array_equal(got, want)  # it is quantized


def test_interleaved_leads_every_timed_call_with_an_untimed_one(monkeypatch):
    from resnetkit.infer import timing
    events, clock = [], iter(range(100))
    monkeypatch.setattr(timing.time, "perf_counter", lambda: events.append("t") or next(clock))
    calls = {"a": lambda: events.append("a"), "b": lambda: events.append("b")}
    t = timing.interleaved(calls, rounds=2, warmup=1)
    # warm-up, then per round and candidate: a lead-in call, the clock, the timed call, the clock
    assert events == ["a", "b"] + ["a", "t", "a", "t", "b", "t", "b", "t"] * 2
    assert t == {"a": [1, 1], "b": [1, 1]}
    assert timing.per_second({"a": [0.5, 1.0, 2.0]}, 4) == {"a": 4.0}
    events.clear()
    timing.interleaved(calls, rounds=1, warmup=0, lead_in=0)
    assert events == ["t", "a", "t", "t", "b", "t"]


def test_onnxruntime_sessions_stop_spinning_after_a_run(files):
    from resnetkit.infer.backends.onnxruntime import session
    s = session(files.onnx("dynamo", "static"), 2, level="basic")
    cfg = s.get_session_options().get_session_config_entry("session.force_spinning_stop")
    assert cfg == "1"
    with pytest.raises(UserError, match="optimisation level is one of"):
        session(files.onnx("dynamo", "static"), level="max")
