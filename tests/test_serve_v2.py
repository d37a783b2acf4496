"""The Open Inference Protocol (KServe v2) of `resnetkit serve`: NVIDIA's tritonclient works
against it unchanged (health, metadata, UINT8 and BYTES inputs, binary and JSON tensors, the
classification extension, versions), its answers equal /predict's and the model's own run
in this process; every bad request is one 4xx JSON sentence and the server lives; a model
repository's new version takes over, a broken one is skipped, a removed one goes; the API
key guards every route but the health checks and the page.

One server serves every test here (a repository with an API key, polled every 0.3 s): the
tests that use it are few and large, so that pytest-xdist, which deals tests out one by
one, starts it at most twice."""
import json
import shutil
import struct
import time

import httpx
import numpy as np
import pytest
import torch

pytest.importorskip("litserve")
th = pytest.importorskip("tritonclient.http")

from serve_helpers import CLASSES, Server, png, write_checkpoint  # noqa: E402

from resnetkit.errors import UserError  # noqa: E402
from resnetkit.serve import ServeConfig  # noqa: E402
from resnetkit.serve import v2  # noqa: E402
from resnetkit.serve.api import open_model  # noqa: E402
from resnetkit.serve.decode import BadInput  # noqa: E402
from resnetkit.serve.repository import Repository, name_of  # noqa: E402

# one process runs this file's tests, so its module fixtures are built once (see pyproject)
pytestmark = pytest.mark.xdist_group("test_serve_v2")

KEY = "k3y-for-the-v2-tests-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}


def auth() -> dict:
    """A fresh header dict for each tritonclient call: its infer() adds its
    Inference-Header-Content-Length to the dict it is given."""
    return dict(AUTH)
LIMITS = {"max_batch": 8, "max_image_pixels": 10_000, "max_body_bytes": 200_000}


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("repository")
    (root / "fashion" / "1").mkdir(parents=True)
    write_checkpoint(root / "fashion" / "1" / "model.safetensors", seed=0)
    (root / "not a name!").mkdir()  # skipped with a log line: not a model name
    return root


@pytest.fixture(scope="module")
def server(repo):
    s = Server(None, "--model-repository", str(repo), "--poll-seconds", "0.3", "--api-key", KEY,
               "--max-batch", "8", "--max-body-mb", "0.2", "--max-image-pixels", "10000",
               "--log-level", "info")
    yield s
    s.close()


def direct_probs(checkpoint, pixels: np.ndarray) -> np.ndarray:
    """The model run in this process on (B, H, W, 1) uint8 pixels of its input size."""
    from resnetkit.data.preprocess import model_input
    runner = open_model(checkpoint, engine="torch", precision="fp32")
    x = model_input(torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()), runner.preprocess)
    return runner(x).float().softmax(1).numpy()


def infer(url: str, model: str, body: bytes, header: int | None = None, **kw) -> httpx.Response:
    headers = {**AUTH, **({"Inference-Header-Content-Length": str(header)}
                          if header is not None else {})}
    return httpx.post(f"{url}/v2/models/{model}/infer", content=body, headers=headers,
                      timeout=30, **kw)


def test_tritonclient_health_metadata_infer_and_classification(server, repo):
    client = th.InferenceServerClient(f"127.0.0.1:{server.port}")
    assert client.is_server_live() and client.is_server_ready()  # open without the key
    assert client.is_model_ready("fashion", headers=auth())
    assert client.is_model_ready("fashion", "1", headers=auth())
    assert client.get_server_metadata(headers=auth())["extensions"] == v2_extensions()
    meta = client.get_model_metadata("fashion", "1", headers=auth())
    assert meta["versions"] == ["1"] and meta["inputs"][0] == {
        "name": "pixels", "datatype": "UINT8", "shape": [-1, -1, -1, 1]}
    assert meta["outputs"][1] == {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}

    pixels = np.random.default_rng(1).integers(0, 256, (3, 28, 28, 1), dtype=np.uint8)
    want = direct_probs(repo / "fashion" / "1" / "model.safetensors", pixels)
    for binary in (True, False):
        x = th.InferInput("pixels", list(pixels.shape), "UINT8")
        x.set_data_from_numpy(pixels, binary_data=binary)
        r = client.infer("fashion", [x], model_version="1", headers=auth(), request_id="r-1",
                         outputs=[th.InferRequestedOutput("probabilities", binary_data=binary),
                                  th.InferRequestedOutput("logits", binary_data=binary,
                                                          class_count=2)])
        assert r.get_response()["id"] == "r-1" and r.get_response()["model_version"] == "1"
        probs = r.as_numpy("probabilities")
        assert probs.shape == (3, 10) and np.allclose(probs, want, atol=0.02)  # bf16 or fp32
        top = r.as_numpy("logits")  # classification: "value:index:label", best first
        assert top.shape == (3, 2)
        for row, p in zip(top, probs):  # (the client gives JSON's BYTES as str)
            fields = [(t.decode() if isinstance(t, bytes) else t).split(":") for t in row]
            index = [int(f[1]) for f in fields]
            assert index[0] == int(np.argmax(p)) and p[index[0]] >= p[index[1]]
            assert float(fields[0][0]) >= float(fields[1][0])  # logits, best first
            assert [f[2] for f in fields] == [CLASSES[i] for i in index]

    # BYTES: encoded files, decoded as /predict decodes an upload; the same answer
    files = [png(p[:, :, 0]) for p in pixels]
    x = th.InferInput("image", [3], "BYTES")
    x.set_data_from_numpy(np.array(files, dtype=object))
    probs = client.infer("fashion", [x], headers=auth()).as_numpy("probabilities")
    assert np.allclose(probs, want, atol=0.02)
    one = httpx.post(f"{server.url}/predict?top_k=10&model=fashion", content=files[0],
                     headers={"Content-Type": "image/png", **AUTH}, timeout=30).json()["top"]
    assert np.allclose([t["prob"] for t in one], probs[0][[t["index"] for t in one]], atol=1e-4)

    check_batching(server, files)

    # nothing private: the model's name and version, never the server's path to it
    text = httpx.get(f"{server.url}/metadata", headers=auth()).text
    assert json.loads(text)["name"] == "fashion" and json.loads(text)["version"] == 1
    assert str(repo) not in text
    metrics = httpx.get(f"{server.url}/metrics", headers=auth()).text
    assert 'resnetkit_model_requests_total{code="200",model="fashion",version="1"}' in metrics
    assert 'resnetkit_model_images_total{model="fashion",version="1"}' in metrics
    check_the_key(server)
    check_bad_requests(server)
    assert "not a name" in server.log()  # the folder that is no model name was skipped


def check_batching(server, files):
    """Many clients at once, on both protocols, answered from batches they share."""
    from concurrent.futures import ThreadPoolExecutor
    body, n = _binary_request([{"name": "image", "datatype": "BYTES", "shape": [1],
                                "parameters": {"binary_data_size": len(files[0]) + 4}}],
                              struct.pack("<I", len(files[0])) + files[0])

    def one(i):
        if i % 2:
            r = infer(server.url, "fashion", body, n)
            return r.status_code, 0
        r = httpx.post(f"{server.url}/predict", content=files[0], timeout=30,
                       headers={"Content-Type": "image/png", **AUTH})
        return r.status_code, r.json()["batch_size"]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(32)))
    assert {status for status, _ in answers} == {200}
    assert max(size for _, size in answers) > 1


def v2_extensions():
    return ["binary_tensor_data", "classification"]


def check_the_key(server):
    for path in ("/health", "/v2/health/live", "/v2/health/ready", "/"):
        assert httpx.get(f"{server.url}{path}").status_code == 200, path
    for method, path in (("GET", "/metadata"), ("GET", "/metrics"), ("GET", "/v2"),
                         ("GET", "/v2/models/fashion"), ("POST", "/v2/models/fashion/infer"),
                         ("POST", "/predict"), ("GET", "/docs"), ("GET", "/openapi.json")):
        for headers in ({}, {"Authorization": "Bearer wrong-key-of-some-length"},
                        {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}):
            r = httpx.request(method, f"{server.url}{path}", headers=headers)
            assert r.status_code == 401 and list(r.json()) == ["error"], (path, headers)
            assert r.headers["www-authenticate"] == "Bearer"
    # the scheme is case-insensitive (RFC 9110)
    lower = {"Authorization": f"bearer {KEY}"}
    assert httpx.get(f"{server.url}/v2", headers=lower).status_code == 200
    page = httpx.get(f"{server.url}/").text
    assert "Authorization" in page and "keyform" in page  # the page asks for the key


def _binary_request(inputs: list[dict], blob: bytes, outputs=None) -> tuple[bytes, int]:
    head = json.dumps({"inputs": inputs, **({"outputs": outputs} if outputs else {})}).encode()
    return head + blob, len(head)


def check_bad_requests(server):
    px = {"name": "pixels", "datatype": "UINT8", "shape": [1, 28, 28, 1]}
    data = list(range(28 * 28))
    cases = {
        "malformed JSON": (b'{"inputs": [', None),
        "not an object": (b"[1, 2]", None),
        "no inputs": (b"{}", None),
        "wrong datatype": (json.dumps({"inputs": [{**px, "datatype": "FP32",
                                                   "data": data}]}).encode(), None),
        "wrong shape": (json.dumps({"inputs": [{**px, "shape": [28, 28], "data": data}]}).encode(),
                        None),
        "shape and data disagree": (json.dumps({"inputs": [{**px, "data": data[:-1]}]}).encode(),
                                    None),
        "values out of range": (json.dumps({"inputs": [{**px, "data": [256] * 784}]}).encode(),
                                None),
        "header longer than the body": (b'{"inputs": []}', 9999),
        "binary size lies": _binary_request(
            [{**px, "parameters": {"binary_data_size": 784}}], bytes(700)),
        "bytes element lies": _binary_request(
            [{"name": "image", "datatype": "BYTES", "shape": [1],
              "parameters": {"binary_data_size": 8}}], struct.pack("<I", 2**31) + b"abcd"),
        "huge bytes element": _binary_request(
            [{"name": "image", "datatype": "BYTES", "shape": [1],
              "parameters": {"binary_data_size": 150_004}}],
            struct.pack("<I", 150_000) + bytes(150_000)),
        "batch over the limit": (json.dumps({"inputs": [{**px, "shape": [9, 1, 1, 1],
                                                         "data": [0] * 9}]}).encode(), None),
        "unknown output": (json.dumps({"inputs": [{**px, "data": data}],
                                       "outputs": [{"name": "features"}]}).encode(), None),
        "classification beyond the classes": (json.dumps({
            "inputs": [{**px, "data": data}],
            "outputs": [{"name": "logits", "parameters": {"classification": 11}}]}).encode(),
            None),
        "body over the limit": (b"x" * 300_000, None),
        "a long shape, not echoed": (json.dumps({"inputs": [{**px, "shape": [0] * 50_000,
                                                              "data": data}]}).encode(), None),
        "a huge dimension": (json.dumps({"inputs": [{**px, "shape": [1, 10**300, 1, 1],
                                                       "data": [0]}]}).encode(), None),
        "an output asked twice": (json.dumps({"inputs": [{**px, "data": data}], "outputs": [
            {"name": "logits"}, {"name": "logits"}]}).encode(), None),
        "binary_data not a bool": (json.dumps({"inputs": [{**px, "data": data}], "outputs": [
            {"name": "logits", "parameters": {"binary_data": "no"}}]}).encode(), None),
    }
    for what, (body, header) in cases.items():
        r = infer(server.url, "fashion", body, header)
        assert 400 <= r.status_code < 500 and list(r.json()) == ["error"], (what, r.text)
        assert "Traceback" not in r.text and len(r.json()["error"]) < 300, what
    # nested brackets, then escaped quotes: the nesting is counted in linear time (the
    # scan was quadratic: 5 s for 40 KB, on the event loop)
    start = time.monotonic()
    r = infer(server.url, "fashion", b"[" * 40 + b'"' + b'\\"' * 90_000)
    assert r.status_code == 400 and "nests deeper" in r.json()["error"]
    assert time.monotonic() - start < 3
    for path in ("/v2/models/fashion/versions//ready",):  # an empty version is no version
        assert httpx.get(f"{server.url}{path}", headers=auth()).status_code == 404, path
    for path in ("/v2/models/nope/infer", "/v2/models/fashion/versions/7/infer",
                 "/v2/models/fashion/versions/x<b>/infer", "/v2/models/%3Cscript%3E/ready"):
        r = httpx.post(f"{server.url}{path}", content=b"{}", headers=auth()) if "infer" in path \
            else httpx.get(f"{server.url}{path}", headers=auth())
        assert r.status_code == 404 and list(r.json()) == ["error"], path
    assert httpx.get(f"{server.url}/v2/health/ready").json() == {"ready": True}


def test_a_repository_takes_new_versions_skips_broken_ones_and_drops_removed_ones(server, repo):
    pixels = np.random.default_rng(2).integers(0, 256, (2, 28, 28, 1), dtype=np.uint8)

    def served(version: str = "") -> tuple[str, np.ndarray]:
        where = f"/versions/{version}" if version else ""
        body, n = _binary_request([{"name": "pixels", "datatype": "UINT8", "shape": [2, 28, 28, 1],
                                    "parameters": {"binary_data_size": pixels.size}}],
                                  pixels.tobytes(), [{"name": "probabilities"}])
        r = httpx.post(f"{server.url}/v2/models/fashion{where}/infer", content=body, timeout=30,
                       headers={**AUTH, "Inference-Header-Content-Length": str(n)})
        assert r.status_code == 200, r.text
        out = r.json()
        return out["model_version"], np.array(out["outputs"][0]["data"]).reshape(2, 10)

    def wait_for(version: str) -> None:
        until = time.monotonic() + 30
        while served()[0] != version:
            assert time.monotonic() < until, server.log()[-2000:]
            time.sleep(0.2)

    one = direct_probs(repo / "fashion" / "1" / "model.safetensors", pixels)
    staging = repo.parent / "staging-2"
    staging.mkdir()
    two_file = write_checkpoint(staging / "model.safetensors", seed=7)
    two = direct_probs(two_file, pixels)
    assert not np.allclose(one, two, atol=0.05)  # the versions can be told apart
    shutil.move(str(staging), str(repo / "fashion" / "2"))
    wait_for("2")  # the highest version is the default, once loaded
    assert np.allclose(served()[1], two, atol=0.02)
    assert np.allclose(served("1")[1], one, atol=0.02)  # the others by URL

    # a broken version is skipped, logged; version 2 keeps serving
    (repo / "fashion" / "3").mkdir()
    (repo / "fashion" / "3" / "model.safetensors").write_bytes(b"\x10\x00" + bytes(100))
    time.sleep(1.5)
    assert served()[0] == "2"
    assert "version 3 was not loaded" in server.log()
    assert httpx.get(f"{server.url}/v2/models/fashion/versions/3/ready",
                     headers=auth()).status_code == 404
    shutil.rmtree(repo / "fashion" / "3")

    # a removed version goes: the default falls back, its URL answers 404
    shutil.rmtree(repo / "fashion" / "2")
    wait_for("1")
    assert np.allclose(served()[1], one, atol=0.02)
    r = httpx.get(f"{server.url}/v2/models/fashion/versions/2", headers=auth())
    assert r.status_code == 404 and "no version '2'" in r.json()["error"]
    assert server.proc.poll() is None


# ---- without a server -------------------------------------------------------------------

def test_parse_reads_binary_and_json_tensors_alike():
    pixels = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4, 1)
    head = {"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [2, 3, 4, 1],
                        "parameters": {"binary_data_size": pixels.size}}],
            "parameters": {"binary_data_output": True}}
    text = json.dumps(head).encode()
    binary = v2.parse(text + pixels.tobytes(), str(len(text)), 1, LIMITS, 10)
    as_json = v2.parse(json.dumps({"inputs": [{**head["inputs"][0], "parameters": {},
                                               "data": pixels.tolist()}]}).encode(),
                       None, 1, LIMITS, 10)
    assert np.array_equal(np.stack(binary.images), pixels)
    assert np.array_equal(np.stack(as_json.images), pixels)
    assert binary.outputs == [("logits", True, 0), ("probabilities", True, 0)]
    assert as_json.outputs == [("logits", False, 0), ("probabilities", False, 0)]
    files = [b"first", b"", b"third one"]
    blob = b"".join(struct.pack("<I", len(f)) + f for f in files)
    head = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [3],
                                   "parameters": {"binary_data_size": len(blob)}}]}).encode()
    assert v2.parse(head + blob, str(len(head)), 1, LIMITS, 10).images == files


def test_answers_in_binary_and_json_agree_with_the_logits():
    logits = np.array([[1.0, 3.0, 2.0], [0.5, -1.0, 0.0]], dtype=np.float32)
    req = v2.Infer("x", "pixels", [], [("logits", True, 0), ("probabilities", False, 2)])
    body, n = v2.answer(req, logits, "m", 4, ["a", "b", "c"])
    head = json.loads(body[:n])
    assert head["model_version"] == "4" and head["id"] == "x"
    assert np.array_equal(np.frombuffer(body[n:], "<f4").reshape(2, 3), logits)
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    top = head["outputs"][1]
    assert top["datatype"] == "BYTES" and top["shape"] == [2, 2]
    assert [t.split(":")[1:] for t in top["data"]] == [["1", "b"], ["2", "c"], ["0", "a"],
                                                       ["2", "c"]]
    assert float(top["data"][0].split(":")[0]) == pytest.approx(p[0, 1], abs=1e-6)


ONE = b'{"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 1, 1, 1], "data": [1]}]}'


@pytest.mark.parametrize("body, header, words", [
    (b'{"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 1, 1, 2], '
     b'"data": [1, 2]}]}', None, "channels"),
    (b'{"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 200, 200, 1], '
     b'"data": []}]}', None, "max-image-pixels"),
    (b'{"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 1, 1, 1], '
     b'"data": [1]}], "id": 5}', None, "id"),
    (ONE + b"xx", str(len(ONE)), "binary_data_size"),
    (b'{"inputs": []}', "1e3", "byte count"),
    (b"[" * 50 + b"]" * 50, None, "nests"),
    (b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2], "data": ["a"]}]}',
     None, "elements"),
])
def test_parse_refuses_in_one_sentence(body, header, words):
    with pytest.raises(BadInput) as e:
        v2.parse(body, header, 1, LIMITS, 10)
    assert 400 <= e.value.status < 500 and words in e.value.message


def test_access_and_names_are_checked_before_anything_starts(tmp_path, monkeypatch):
    monkeypatch.delenv("RESNETKIT_API_KEY", raising=False)
    with pytest.raises(UserError, match="--insecure"):
        ServeConfig(host="0.0.0.0")
    assert ServeConfig(host="0.0.0.0", insecure=True).api_key is None
    monkeypatch.setenv("RESNETKIT_API_KEY", KEY)
    assert ServeConfig(host="0.0.0.0").api_key == KEY and KEY not in repr(ServeConfig())
    with pytest.raises(UserError, match="16 to"):
        ServeConfig(api_key="short")
    with pytest.raises(UserError, match="no model"):
        Repository(str(tmp_path)).check()
    with pytest.raises(UserError, match="not a model name"):
        Repository(source="x", name="../up")
    assert name_of(str(tmp_path / "my run (2)")) == "my-run--2-"
    assert name_of("runs/fashion/best.safetensors") == "best"


def test_a_version_counts_an_infer_request_while_its_body_arrives(tmp_path, monkeypatch):
    # in flight from the moment it is routed: a version removed while a body uploads drains
    # the request rather than being unloaded under it; and a model may be named "ready"
    import asyncio
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    from resnetkit.serve.decode import Decoder
    from resnetkit.serve.predictor import Predictor
    from resnetkit.serve.routing import Served
    from resnetkit.serve.v2_routes import OpenInference
    pre = {"mean": [0.5], "std": [0.5], "image_size": 28, "in_chans": 1, "resize": 32,
           "interpolation": "bilinear"}
    served = Served("ready/1/fixed", {"name": "ready", "version": 1, "preprocess": pre,
                                      "classes": CLASSES, "engine": "torch"},
                    Decoder(pre, 10_000), None)

    class Table:
        ready, table = True, {"ready": {1: served}}

        def find(self, name, version=None):
            assert name == "ready"
            return served
    limits = {**LIMITS, "max_queue": 4}
    v2_routes = OpenInference(Table(), Predictor(None, Table(), limits), limits)
    seen = []

    async def receive():
        seen.append(served.inflight)
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def run():
        post = {"path": "/v2/models/ready/infer", "method": "POST", "headers": []}
        get = {"path": "/v2/models/ready", "method": "GET", "headers": []}
        return await v2_routes(post, receive), await v2_routes(get, receive)
    refused, meta = asyncio.run(run())
    assert refused[0] == 400 and seen == [1] and served.inflight == 0
    assert meta[0] == 200 and json.loads(meta[1])["name"] == "ready"
