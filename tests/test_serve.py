"""`resnetkit serve`: predictions equal the Python API's, every bad input is one 4xx JSON
sentence and the server keeps serving, the queue limit answers 503 with Retry-After and
loses no accepted request, SIGTERM drains and leaves no process; the batcher and decoder
on their own. Hostile clients: a flood of headers is refused with 431 before it is buffered,
a client that trickles its request is cut off at the deadline, large images are decoded off
the event loop (/health stays fast), text from a request is escaped in the log and answers."""
import asyncio
import json
import logging
import os
import re
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import psutil
import pytest
import torch

pytest.importorskip("litserve")

from serve_helpers import CLASSES, Server, exchange, png, trickle, write_checkpoint  # noqa: E402

from resnetkit.cli import main  # noqa: E402
from resnetkit.infer import predict  # noqa: E402
from resnetkit.serve.batcher import Batcher  # noqa: E402
from resnetkit.serve.decode import BadInput, check_type, decode_image  # noqa: E402
from resnetkit.serve.api import open_model as open_engine  # noqa: E402

# one process runs this file's tests, so its module fixtures are built once (see pyproject)
pytestmark = pytest.mark.xdist_group("test_serve")

PRE = {"mean": [0.29], "std": [0.35], "image_size": 28, "in_chans": 1, "resize": 0,
       "interpolation": "bilinear"}  # complete, as a checkpoint's entry is once read


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("serve") / "r20.safetensors")


DEADLINE_S = 3  # the test server's time for a request's head and body (60 s by default)


@pytest.fixture(scope="module")
def server(checkpoint):
    # a 300 ms batch window: requests wait for company, so a burst fills the small queue; 40
    # million pixels (the default) and 0.1 MB: a 35 KB PNG of 36 million pixels takes a long
    # decode; the log from INFO up, where refused uploads are named
    s = Server(checkpoint, "--max-queue", "4", "--batch-timeout-ms", "300", "--max-batch", "64",
               "--max-image-pixels", "40000000", "--max-body-mb", "0.1", "--log-level", "info",
               "--request-timeout-s", str(DEADLINE_S), "--name", "fm-20")
    yield s
    s.close()


def images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (28, 28), dtype=np.uint8) for _ in range(n)]


def test_predictions_equal_the_python_api(server, checkpoint, tmp_path):
    img = images(1)[0]
    (tmp_path / "x.png").write_bytes(png(img))
    want = predict(checkpoint, [tmp_path / "x.png"], top_k=3)[0]["top"]
    raw = httpx.post(f"{server.url}/predict?top_k=3", content=png(img),
                     headers={"Content-Type": "image/png"}, timeout=30)
    form = httpx.post(f"{server.url}/predict?top_k=3", files={"file": ("x.png", png(img))},
                      timeout=30)
    for r in (raw, form):
        assert r.status_code == 200, r.text
        got = r.json()["top"]
        assert [t["index"] for t in got] == [t["index"] for t in want]
        assert [t["class"] for t in got] == [CLASSES[t["index"]] for t in want]
        # bf16 where the CPU has it: probabilities to bf16's 8 bits of mantissa
        assert np.allclose([t["prob"] for t in got], [t["prob"] for t in want], atol=0.02)


def test_explain_answers_as_predict_with_a_heatmap_of_the_first_class(server, checkpoint):
    """POST /explain: /predict's answer plus "why", the Grad-CAM of the first class (its
    pixels are compared with an independent computation in test_serve_page); bad uploads are
    refused as /predict refuses them."""
    import base64
    import io

    from PIL import Image
    img = images(1, seed=5)[0]
    pred = httpx.post(f"{server.url}/predict?top_k=3", content=png(img),
                      headers={"Content-Type": "image/png"}, timeout=30).json()
    r = httpx.post(f"{server.url}/explain?top_k=3", content=png(img),
                   headers={"Content-Type": "image/png"}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert [t["index"] for t in body["top"]] == [t["index"] for t in pred["top"]]
    why = body["why"]
    assert (why["method"], why["layer"], why["class"]) == ("gradcam", "layer3", pred["top"][0]["class"])
    for key, mode in (("heatmap", "RGBA"), ("view", "L")):
        head, _, data = why[key].partition(",")
        pic = Image.open(io.BytesIO(base64.b64decode(data)))
        assert head == "data:image/png;base64" and (pic.mode, pic.size) == (mode, (28, 28))
    bad = httpx.post(f"{server.url}/explain", content=b"GIF89a garbage",
                     headers={"Content-Type": "image/gif"}, timeout=30)
    assert bad.status_code == 400 and list(bad.json()) == ["error"]


def _bomb(side: int = 2000) -> bytes:  # side**2 pixels in about side**2 / 1000 bytes
    return png(np.zeros((side, side), dtype=np.uint8))


BOMB = _bomb(7000)  # over the test server's 40 million pixels, under its 0.1 MB


BAD = [  # (what, request kwargs, status)
    ("empty body", {"content": b"", "headers": {"Content-Type": "image/png"}}, 400),
    ("not an image", {"content": b"GIF89a garbage" * 10, "headers": {"Content-Type": "image/gif"}}, 400),
    # a format Pillow knows but the server does not take from the network (EPS would run
    # Ghostscript where it is installed)
    ("postscript", {"content": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 28 28\n" * 4,
                    "headers": {"Content-Type": "application/octet-stream"}}, 400),
    ("truncated png", {"content": png(np.random.default_rng(0).integers(0, 256, (28, 28),
                                                                            dtype=np.uint8))[:400],
                       "headers": {"Content-Type": "image/png"}}, 400),
    ("wrong content type", {"content": b"hello", "headers": {"Content-Type": "text/plain"}}, 415),
    ("json body", {"json": {"image": "x"}}, 415),
    ("decompression bomb", {"content": BOMB, "headers": {"Content-Type": "image/png"}}, 413),
    ("body over --max-body-mb", {"content": os.urandom(150_000),
                                 "headers": {"Content-Type": "image/png"}}, 413),
    ("multipart without a file", {"data": {"name": "x"}, "files": {}}, 415),
    ("multipart with no file field", {"content": b"--b\r\nContent-Disposition: form-data; "
                                      b"name=\"a\"\r\n\r\nx\r\n--b--\r\n",
                                      "headers": {"Content-Type": "multipart/form-data; boundary=b"}}, 400),
    ("top_k of 0", {"content": b"x", "headers": {"Content-Type": "image/png"},
                    "params": {"top_k": 0}}, 422),
]


@pytest.mark.parametrize("what,kw,status", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_sentence_and_the_server_keeps_serving(server, what, kw, status):
    assert len(BOMB) < 100_000  # under --max-body-mb: the pixel check is what refuses it
    r = httpx.post(f"{server.url}/predict", timeout=30, **kw)
    assert r.status_code == status, (what, r.text)
    body = r.json()
    assert list(body) == ["error"] and isinstance(body["error"], str)
    assert not re.search(r"\. [A-Z]", body["error"]) and "\n" not in body["error"]  # one sentence
    assert "Traceback" not in body["error"]
    ok = httpx.post(f"{server.url}/predict", content=png(images(1)[0]),
                    headers={"Content-Type": "image/png"}, timeout=30)
    assert ok.status_code == 200
    assert server.proc.poll() is None


def test_health_metadata_docs_and_metrics(server, checkpoint):
    assert httpx.get(f"{server.url}/health").status_code == 200
    text = httpx.get(f"{server.url}/metadata").text
    meta = json.loads(text)
    # the model's name (--name) and version, never the server's path to it
    assert meta["name"] == "fm-20" and meta["version"] == 1 and meta["models"] == {"fm-20": [1]}
    assert str(checkpoint.parent) not in text
    assert meta["classes"] == CLASSES and meta["preprocess"]["image_size"] == 28
    assert meta["engine"] == "torch" and meta["precision"] in ("fp32", "bf16")
    card = meta["card"]
    model = __import__("resnetkit").create_model("resnet20", in_chans=1, num_classes=10)
    assert card["preset"] == "resnet20"
    assert card["params"] == sum(p.numel() for p in model.parameters())
    assert card["depth"]["total"] == 20 and card["diagram_svg"].startswith("<svg")
    assert "/predict" in httpx.get(f"{server.url}/openapi.json").json()["paths"]
    assert httpx.get(f"{server.url}/docs").status_code == 200
    assert httpx.head(f"{server.url}/health").status_code == 200
    for method, path, status in (("GET", "/predict", 405), ("PUT", "/predict", 405),
                                 ("GET", "/no-such-page", 404)):
        r = httpx.request(method, f"{server.url}{path}")
        assert r.status_code == status and list(r.json()) == ["error"]
    page = httpx.get(f"{server.url}/").text
    assert "<html" in page and "/metadata" in page

    def count(text, name):
        return sum(float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith(name) and not line.startswith("#"))
    before = httpx.get(f"{server.url}/metrics").text
    r = httpx.post(f"{server.url}/predict", content=png(images(1)[0]),
                   headers={"Content-Type": "image/png"}, timeout=30)
    assert r.status_code == 200
    after = httpx.get(f"{server.url}/metrics").text
    for name in ("resnetkit_batch_size_count", "resnetkit_request_latency_seconds_count",
                 "resnetkit_images_total", 'resnetkit_requests_total{code="200"}'):
        assert count(after, name) == count(before, name) + 1, name
    assert "resnetkit_queue_depth" in after and "resnetkit_errors_total" in after


async def _burst(url: str, n: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=n)) as c:
        return await asyncio.gather(*(
            c.post(f"{url}/predict", content=png(img), headers={"Content-Type": "image/png"})
            for img in images(n, seed=1)))


def test_a_full_queue_answers_503_and_every_accepted_request_is_answered(server):
    responses = asyncio.run(_burst(server.url, 32))
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503}, codes
    assert codes.count(503) > 0 and codes.count(200) >= 4
    busy = [r for r in responses if r.status_code == 503]
    assert all(r.headers.get("retry-after") == "1" and "queue limit" in r.json()["error"]
               for r in busy)
    # the accepted ones were batched together: the 300 ms window held them
    assert max(r.json()["batch_size"] for r in responses if r.status_code == 200) > 1


def test_sigterm_drains_accepted_requests_then_exits_0_leaving_no_process(checkpoint):
    s = Server(checkpoint, "--workers", "2", "--batch-timeout-ms", "1500", "--max-batch", "64")
    try:
        tree = [p.pid for p in psutil.Process(s.proc.pid).children(recursive=True)]
        assert len(tree) >= 3  # the HTTP process, 2 inference workers (and LitServe's manager)

        async def in_flight_then_term():
            async with httpx.AsyncClient(timeout=60) as c:
                sent = [asyncio.create_task(c.post(
                    f"{s.url}/predict", content=png(img), headers={"Content-Type": "image/png"}))
                    for img in images(3)]
                await asyncio.sleep(0.5)  # accepted, waiting in the 1.5 s batch window
                s.proc.send_signal(signal.SIGTERM)
                return await asyncio.gather(*sent)
        responses = asyncio.run(in_flight_then_term())
        assert [r.status_code for r in responses] == [200, 200, 200]
        assert s.proc.wait(60) == 0
        time.sleep(1)
        left = [p for p in tree if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
        assert left == [], [psutil.Process(p).cmdline() for p in left]
    finally:
        s.close()


def test_cli_mistakes_are_one_sentence(checkpoint, capsys):
    assert main(["serve", "no/such/model", "--port", "8123"]) == 2
    assert "neither a file" in capsys.readouterr().err
    assert main(["serve", str(checkpoint), "--host", "10.0.0.1"]) == 2
    assert "--host must be one of" in capsys.readouterr().err
    assert main(["serve", str(checkpoint), "--max-batch", "0"]) == 2
    assert "--max-batch must be at least 1" in capsys.readouterr().err
    assert main(["serve", str(checkpoint), "--precision", "int8"]) == 2
    assert "needs --calibration" in capsys.readouterr().err
    assert main(["serve", str(checkpoint), "--calibration", "fashion-mnist:64"]) == 2
    assert "--calibration is for --precision int8 only" in capsys.readouterr().err
    assert main(["serve", str(checkpoint), "--precision", "int8", "--calibration",
                 "fashion-mnist:1"]) == 2
    err = capsys.readouterr().err  # the spec's check or the set's, both name the count of 2
    assert "calibration" in err and "2" in err and "Traceback" not in err
    assert main(["serve", str(checkpoint), "--worker-nice", "20"]) == 2
    assert "--worker-nice must be from 0 to 19" in capsys.readouterr().err
    assert main(["serve", str(checkpoint), "--threads", "-1"]) == 2
    err = capsys.readouterr().err
    assert "--threads must be 0" in err and "got -1" in err and "Traceback" not in err


def test_int8_engine_for_serving_agrees_with_fp32(checkpoint, tmp_path):
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    from resnetkit.data import load_dataset
    from resnetkit.errors import UserError
    from resnetkit.evaluate import preprocess
    images = load_dataset("fashion-mnist", "test").images[:64]
    x = preprocess(images, PRE["mean"], PRE["std"])
    fp32 = open_engine(checkpoint, "torch", "fp32")(x)
    # auto: OpenVINO (part of the [all] install); ONNX Runtime's QDQ file is checked by
    # test_quantize.py
    int8 = open_engine(checkpoint, "auto", "int8", calibration="fashion-mnist:128")
    assert (int8.engine, int8.precision) == ("openvino", "int8")
    out = int8(x)
    spread = (fp32.max() - fp32.min()).item()
    assert (out - fp32).abs().max().item() <= 0.1 * spread
    assert (out.argmax(1) == fp32.argmax(1)).float().mean().item() >= 0.9
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"x")
    with pytest.raises(UserError, match="served as it was exported"):
        open_engine(onnx, "auto", "int8", calibration="fashion-mnist:64")


def test_decode_checks_pixels_before_decoding_and_follows_the_preprocessing():
    with pytest.raises(BadInput) as e:
        decode_image(_bomb(), PRE, max_pixels=1_000_000)
    assert e.value.status == 413 and "4,000,000 pixels" in e.value.message
    rgb = np.zeros((40, 56, 3), np.uint8)
    rgb[:, :, 0] = 255  # pure red: luma 0.299 * 255 = 76
    out = decode_image(png(rgb), PRE, max_pixels=10_000)
    assert out.shape == (1, 28, 28) and out.dtype == np.uint8 and abs(int(out[0, 0, 0]) - 76) <= 1
    assert check_type("image/png; charset=binary") == "image/png"
    with pytest.raises(BadInput, match="not one of PNG, JPEG"):  # never handed to Ghostscript
        decode_image(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 28 28\n", PRE, 10_000)
    with pytest.raises(BadInput):
        check_type(None)


def test_batcher_gathers_routes_results_and_reports_failures():
    seen = []

    async def submit(payload):
        seen.append(len(payload["top_k"]))
        await asyncio.sleep(0.05)
        return [{"id": int(x[0, 0, 0]), "k": k} for x, k in zip(payload["images"], payload["top_k"])]

    async def run():
        b = Batcher(submit, max_batch=4, timeout_s=0.02, slots=1)
        return await asyncio.gather(*(b(np.full((1, 2, 2), i, np.uint8), i) for i in range(10)))
    out = asyncio.run(run())
    assert [o["id"] for o in out] == list(range(10)) and [o["k"] for o in out] == list(range(10))
    assert sum(seen) == 10 and max(seen) == 4 and len(seen) < 10

    async def broken(payload):
        raise RuntimeError("engine down")

    async def run_broken():
        b = Batcher(broken, max_batch=4, timeout_s=0.0, slots=2)
        return await asyncio.gather(*(b(np.zeros((1, 2, 2), np.uint8), 1) for _ in range(3)),
                                    return_exceptions=True)
    assert all(isinstance(e, RuntimeError) for e in asyncio.run(run_broken()))


def test_engines_agree_and_refuse_what_they_cannot_run(checkpoint, tmp_path):
    from resnetkit.errors import UserError
    x = torch.randn(3, 1, 28, 28)
    torch_fp32 = open_engine(checkpoint, "torch", "fp32")
    ort = open_engine(checkpoint, "onnxruntime")
    assert (torch_fp32.engine, ort.engine, ort.precision) == ("torch", "onnxruntime", "fp32")
    a, b = torch_fp32(x), ort(x)
    assert torch.allclose(a, b, atol=1e-4 * a.abs().max().item(), rtol=0)
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"not a model")
    with pytest.raises(UserError, match="not torch"):
        open_engine(onnx, "torch")
    with pytest.raises(UserError, match="engine must be one of"):
        open_engine(checkpoint, "tensorrt")


def test_litserves_own_batching_gives_the_same_answers(checkpoint, tmp_path):
    imgs = images(6, seed=2)
    for i, img in enumerate(imgs):
        (tmp_path / f"{i}.png").write_bytes(png(img))
    want = predict(checkpoint, [tmp_path / f"{i}.png" for i in range(6)], top_k=2)
    s = Server(checkpoint, "--batching", "litserve", "--max-batch", "8", "--batch-timeout-ms", "200")
    try:
        async def burst():
            async with httpx.AsyncClient(timeout=60) as c:
                return await asyncio.gather(*(c.post(
                    f"{s.url}/predict?top_k=2", content=png(img),
                    headers={"Content-Type": "image/png"}) for img in imgs))
        got = asyncio.run(burst())
        assert [r.status_code for r in got] == [200] * 6
        why = httpx.post(f"{s.url}/explain?top_k=2", content=png(imgs[0]),
                         headers={"Content-Type": "image/png"}, timeout=60).json()
        assert why["why"]["class"] == why["top"][0]["class"] == CLASSES[want[0]["top"][0]["index"]]
        assert [[t["index"] for t in r.json()["top"]] for r in got] == \
            [[t["index"] for t in w["top"]] for w in want]
        assert httpx.get(f"{s.url}/metadata").json()["limits"]["batching"] == "litserve"
        # the Open Inference Protocol's images go through LitServe's batches too
        v2 = httpx.post(f"{s.url}/v2/models/{checkpoint.stem}/infer", timeout=60, json={
            "inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [2, 28, 28, 1],
                        "data": np.stack(imgs[:2]).ravel().tolist()}],
            "outputs": [{"name": "probabilities", "parameters": {"classification": 1}}]})
        assert v2.status_code == 200, v2.text
        assert [int(t.split(":")[1]) for t in v2.json()["outputs"][0]["data"]] == \
            [w["top"][0]["index"] for w in want[:2]]
    finally:
        s.close()


class OneModel:
    """The routing table (routing.Models) of one model, for the handlers on their own."""

    def __init__(self, limits):
        from resnetkit.serve.decode import Decoder
        from resnetkit.serve.routing import Served
        self.served = Served("m/1/fixed", {"name": "m", "version": 1, "preprocess": PRE},
                             Decoder(PRE, limits["max_image_pixels"]), None)
        self.ready = True

    def find(self, name, version):
        return self.served

    def watch(self):
        pass


def test_predict_handler_at_the_asgi_level(tmp_path, monkeypatch):
    # the handler the middleware calls for every POST /predict, driven with ASGI messages:
    # the query check, the body limit, the queue limit and a good answer, in-process
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    from resnetkit.serve.protocol import DEADLINE_KEY
    from resnetkit.serve.predictor import Predictor
    limits = {"max_queue": 1, "max_body_bytes": 1000, "max_image_pixels": 10_000}
    info = OneModel(limits)
    release = asyncio.Event()

    async def run_one(model, image, top_k):
        assert model is info.served
        await release.wait()
        return {"shape": list(image.shape), "k": top_k}

    def scope(query=b"", kind=b"image/png", length=None):
        headers = [(b"content-type", kind)] + ([(b"content-length", length)] if length else [])
        return {"type": "http", "query_string": query, "headers": headers}

    def receive_of(body: bytes, pieces: int = 3):
        step = max(1, len(body) // pieces)
        chunks = [body[i:i + step] for i in range(0, len(body), step)] or [b""]
        messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
                    for i, c in enumerate(chunks)]

        async def receive():
            return messages.pop(0)
        return receive

    image = png(np.arange(28 * 28, dtype=np.uint8).reshape(28, 28))

    async def run():
        p = Predictor(run_one, info, limits)
        out = {}
        for name, q in (("zero", b"top_k=0"), ("word", b"top_k=five"), ("big", b"top_k=1001"),
                        ("blank", b"top_k="), ("underscore", b"top_k=1_0"), ("minus", b"top_k=-1"),
                        ("huge", b"top_k=" + b"9" * 5000)):
            out[name] = await p(scope(q), receive_of(image))

        async def stalled():
            await asyncio.sleep(3600)
        out["stalled"] = await Predictor(run_one, info, {**limits, "body_timeout_s": 0.05})(
            scope(), stalled)

        async def drip():  # a byte every 20 ms: never a stall, but past the request's deadline
            await asyncio.sleep(0.02)
            return {"type": "http.request", "body": b"x", "more_body": True}
        late = {**scope(), DEADLINE_KEY: asyncio.get_running_loop().time() + 0.2}
        out["late"] = await Predictor(run_one, info, limits)(late, drip)
        seen = []  # a version counts a request as in flight while its body arrives (a
        # version removed meanwhile drains it rather than being unloaded under it)

        async def counted():
            seen.append(info.served.inflight)
            return {"type": "http.request", "body": b"not an image", "more_body": False}
        out["counted"] = await p(scope(), counted)
        out["inflight"] = (seen, info.served.inflight)
        out["declared"] = await p(scope(length=b"5000"), receive_of(image))
        out["streamed"] = await p(scope(), receive_of(bytes(1500), pieces=5))
        out["type"] = await p(scope(kind=b"text/plain"), receive_of(image))
        first = asyncio.ensure_future(p(scope(b"top_k=3"), receive_of(image)))
        await asyncio.sleep(0.01)  # the first is accepted and waits for its batch
        out["full"] = await p(scope(), receive_of(image))
        release.set()
        out["ok"] = await first
        out["pending"] = p.pending
        return out
    out = asyncio.run(run())
    for name in ("zero", "word", "big", "blank", "underscore", "minus", "huge"):
        assert out[name][0] == 422 and b"query.top_k" in out[name][1]
        assert len(out[name][1]) < 200  # a 5,000-digit value is not echoed back
    assert b"from 1 to 1000" in out["huge"][1] and b"from 1 to 1000" in out["minus"][1]
    assert out["stalled"][0] == 408 and b"stalled" in out["stalled"][1]
    assert out["late"][0] == 408 and b"did not arrive within" in out["late"][1]
    assert out["counted"][0] == 400 and out["inflight"] == ([1], 0)
    assert out["declared"][0] == 413 and out["streamed"][0] == 413 and out["type"][0] == 415
    assert out["full"][0] == 503 and (b"retry-after", b"1") in out["full"][3]
    status, body, kind, _ = out["ok"]
    assert status == 200 and kind == b"application/json"
    assert json.loads(body) == {"shape": [1, 28, 28], "k": 3} and out["pending"] == 0


def test_a_fault_in_the_predict_handler_is_one_json_500_and_an_escaped_log(tmp_path, monkeypatch,
                                                                           caplog):
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    from resnetkit.serve.routes import FastPaths, Predictor

    async def broken(model, image, top_k):  # a message that quotes a request: escaped in the log
        raise RuntimeError("engine down\n\x1b[31mINFO: a forged line")
    limits = {"max_queue": 4, "max_body_bytes": 10_000, "max_image_pixels": 10_000,
              "workers": 1}
    models = OneModel(limits)
    paths = FastPaths(None, Predictor(broken, models, limits), None, models, None)
    body = png(np.zeros((28, 28), np.uint8))
    sent = []

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)
    scope = {"type": "http", "path": "/predict", "method": "POST", "query_string": b"",
             "headers": [(b"content-type", b"image/png")]}
    with caplog.at_level(logging.ERROR, "resnetkit.serve"):
        asyncio.run(paths(scope, receive, send))
    assert sent[0]["status"] == 500
    assert json.loads(sent[1]["body"]) == {
        "error": "the server failed on this request (RuntimeError)"}
    assert "RuntimeError: engine down\\x0a\\x1b[31mINFO: a forged line" in caplog.text
    assert "\x1b" not in caplog.text and "\nINFO: a forged line" not in caplog.text


def test_a_header_flood_is_refused_and_the_server_keeps_serving(server):
    head = b"GET /health HTTP/1.1\r\nHost: x\r\n"
    image = png(np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8))
    cases = [("1 MB in one header", head + b"X-Flood: " + b"a" * (1 << 20) + b"\r\n\r\n", 431),
             ("a 1 MB path", b"GET /" + b"a" * (1 << 20) + b" HTTP/1.1\r\nHost: x\r\n\r\n", 431),
             ("150 header lines", head + b"".join(b"X-%d: 1\r\n" % i for i in range(150))
              + b"\r\n", 431),
             # 45 KB in 90 lines, under both limits, with the image in the same write
             ("within the limits", b"POST /predict HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
              b"Content-Type: image/png\r\nContent-Length: %d\r\n" % len(image)
              + b"".join(b"X-%d: %s\r\n" % (i, b"b" * 500) for i in range(88)) + b"\r\n"
              + image, 200)]
    for what, request, status in cases:
        got, body = exchange(server.port, request)
        assert got == status, (what, got, body[:200])
        if status == 431:
            error = json.loads(body)["error"]
            assert "server's limit" in error and "\n" not in error
    assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200


def test_a_trickling_client_is_cut_off_at_the_deadline(server):
    upload = (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
              b"Content-Length: 1000\r\n\r\n")
    with ThreadPoolExecutor(2) as pool:
        slow_head = pool.submit(trickle, server.port, b"GET /health HTTP/1.1\r\nX-Slow: ",
                                b"abcdef")
        slow_body = pool.submit(trickle, server.port, upload, b"\x89PNG")
        # meanwhile the server answers others, and a connection kept alive for longer than
        # the deadline, with requests that each arrive at once, is not cut
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            for _ in range(10):
                t = time.perf_counter()
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                reply = b""
                while not reply.endswith(b"\r\n\r\nok"):
                    chunk = sock.recv(4096)
                    assert chunk, "the server closed a kept-alive connection"
                    reply += chunk
                assert reply.startswith(b"HTTP/1.1 200") and time.perf_counter() - t < 1
                time.sleep(0.45)
        results = {"headers": slow_head.result(), "upload": slow_body.result()}
    for what, (status, body, took) in results.items():
        assert status == 408, (what, status, body[:200])
        assert "did not arrive within" in json.loads(body)["error"], what
        # the deadline, then at most the grace before the connection is closed, and slack
        assert DEADLINE_S - 0.5 < took < DEADLINE_S + 2.5, (what, took)


def test_health_stays_fast_while_large_images_decode(server):
    big = png(np.zeros((6000, 6000), np.uint8))  # 36 million pixels in 35 KB
    assert len(big) < 0.1 * 2**20
    codes, waits, stop = [], [], time.monotonic() + 3

    def health():
        with httpx.Client(timeout=30) as c:
            while time.monotonic() < stop:
                t = time.perf_counter()
                assert c.get(f"{server.url}/health").status_code == 200
                waits.append(time.perf_counter() - t)
                time.sleep(0.02)

    async def uploads():
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=20)) as c:
            async def client():
                while time.monotonic() < stop:
                    r = await c.post(f"{server.url}/predict", content=big,
                                     headers={"Content-Type": "image/png"})
                    codes.append(r.status_code)
                    if r.status_code == 503:  # the queue (decodes included) is full: back off
                        await asyncio.sleep(0.05)
            await asyncio.gather(*(client() for _ in range(20)))
    poller = threading.Thread(target=health)
    poller.start()
    asyncio.run(uploads())
    poller.join()
    assert set(codes) <= {200, 503} and codes.count(200) >= 2, codes
    assert len(waits) >= 10 and max(waits) < 1.0, (len(waits), max(waits, default=None))


def test_text_from_a_request_is_escaped_in_the_log_and_in_answers(server):
    name = "evil\x1b[2J\u202egnp.exe\x07.png"  # clear the screen, reverse the text, ring
    body = (b'--b\r\nContent-Disposition: form-data; name="file"; filename="'
            + name.encode() + b'"\r\nContent-Type: image/png\r\n\r\nnot an image\r\n--b--\r\n')
    r = httpx.post(f"{server.url}/predict", content=body, timeout=30,
                   headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert r.status_code == 400
    # a content type holding CSI (U+009B, a terminal's control sequence introducer)
    r = httpx.post(f"{server.url}/predict", content=b"x", timeout=30,
                   headers={"Content-Type": b"image/x\xc2\x9b31m"})
    error = r.json()["error"]
    assert r.status_code == 415 and "\x9b" not in error and "\\x9b31m" in error
    until = time.monotonic() + 10
    while "evil" not in server.log() and time.monotonic() < until:
        time.sleep(0.1)
    log = server.log()
    lines = [line for line in log.splitlines() if "evil" in line]
    assert len(lines) == 1 and "refused the file" in lines[0], lines
    assert "evil\\x1b[2J\\u202egnp.exe\\x07.png" in lines[0]
    assert not {"\x1b", "\u202e", "\x07", "\x9b"} & set(log)
