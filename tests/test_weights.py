"""Published weights: every registry entry's architecture against an independent description
of its publisher's layout, foreign formats (torchvision, timm, Paddle), unsafe pickles,
downloads from a local HTTP server, and the publishers' eval preprocessing."""
import http.server
import os
import pickle
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import resnetkit as rk
from resnetkit.errors import UserError
from resnetkit.weights import download as dl
from resnetkit.weights import sources as P
from resnetkit.weights.registry import REGISTRY, Weights

# ---- an independent description of torchvision's (and timm's) ResNet layout -------------
# Written from torchvision's architecture (torchvision/models/resnet.py as documented): block
# kind, blocks per stage, groups and width per group; stride on the 3x3 (v1.5); a projection
# (1x1 conv + BN) in the first block of a stage when the shape changes. timm's "d" variants:
# deep stem conv1.0/1.1/1.3/1.4/1.6 (32, 32, 64 channels) and avg-down projections (pool,
# conv downsample.1, BN downsample.2).
SPECS = {
    "resnet18": ("basic", (2, 2, 2, 2), 1, 64), "resnet34": ("basic", (3, 4, 6, 3), 1, 64),
    "resnet50": ("bottleneck", (3, 4, 6, 3), 1, 64), "resnet101": ("bottleneck", (3, 4, 23, 3), 1, 64),
    "resnet152": ("bottleneck", (3, 8, 36, 3), 1, 64),
    "resnext50_32x4d": ("bottleneck", (3, 4, 6, 3), 32, 4),
    "resnext101_32x8d": ("bottleneck", (3, 4, 23, 3), 32, 8),
    "resnext101_64x4d": ("bottleneck", (3, 4, 23, 3), 64, 4),
    "wide_resnet50_2": ("bottleneck", (3, 4, 6, 3), 1, 128),
    "wide_resnet101_2": ("bottleneck", (3, 4, 23, 3), 1, 128),
    "resnet50d": ("bottleneck", (3, 4, 6, 3), 1, 64),
}


def _spec(preset):
    kind, layers, groups, wpg = SPECS[preset]
    return kind, layers, groups, wpg, preset in ("resnet50d",)


def _bn(sd, name, c, g):
    sd[f"{name}.weight"] = torch.rand(c, generator=g) + 0.5
    sd[f"{name}.bias"] = torch.randn(c, generator=g) * 0.1
    sd[f"{name}.running_mean"] = torch.randn(c, generator=g) * 0.1
    sd[f"{name}.running_var"] = torch.rand(c, generator=g) + 0.5
    sd[f"{name}.num_batches_tracked"] = torch.tensor(0)


def _conv(sd, name, cout, cin, k, g):
    sd[f"{name}.weight"] = torch.randn(cout, cin, k, k, generator=g) * (2 / (cin * k * k)) ** 0.5


def publisher_state_dict(preset, num_classes=1000, seed=0):
    """A random state_dict with the publisher's names and shapes."""
    kind, layers, groups, wpg, deep = _spec(preset)
    g, sd = torch.Generator().manual_seed(seed), {}
    if deep:
        _conv(sd, "conv1.0", 32, 3, 3, g), _bn(sd, "conv1.1", 32, g)
        _conv(sd, "conv1.3", 32, 32, 3, g), _bn(sd, "conv1.4", 32, g)
        _conv(sd, "conv1.6", 64, 32, 3, g)
    else:
        _conv(sd, "conv1", 64, 3, 7, g)
    _bn(sd, "bn1", 64, g)
    exp, cin = (4 if kind == "bottleneck" else 1), 64
    for i, (n, planes) in enumerate(zip(layers, (64, 128, 256, 512))):
        for j in range(n):
            p, cout = f"layer{i + 1}.{j}", planes * exp
            stride = 2 if (i and not j) else 1
            if kind == "basic":
                _conv(sd, f"{p}.conv1", planes, cin, 3, g), _bn(sd, f"{p}.bn1", planes, g)
                _conv(sd, f"{p}.conv2", planes, planes, 3, g), _bn(sd, f"{p}.bn2", planes, g)
            else:
                w = int(planes * wpg / 64) * groups
                _conv(sd, f"{p}.conv1", w, cin, 1, g), _bn(sd, f"{p}.bn1", w, g)
                sd[f"{p}.conv2.weight"] = torch.randn(w, w // groups, 3, 3, generator=g) * (2 / (9 * w / groups)) ** 0.5
                _bn(sd, f"{p}.bn2", w, g)
                _conv(sd, f"{p}.conv3", cout, w, 1, g), _bn(sd, f"{p}.bn3", cout, g)
            if stride != 1 or cin != cout:
                d = 1 if deep else 0
                _conv(sd, f"{p}.downsample.{d}", cout, cin, 1, g), _bn(sd, f"{p}.downsample.{d + 1}", cout, g)
            cin = cout
    sd["fc.weight"] = torch.randn(num_classes, cin, generator=g) * 0.05
    sd["fc.bias"] = torch.randn(num_classes, generator=g) * 0.05
    return sd


def reference_forward(preset, sd, x):
    """The publisher's forward pass, written with torch.nn.functional from the description."""
    kind, layers, groups, wpg, deep = _spec(preset)

    def bn(t, n):
        return F.batch_norm(t, sd[f"{n}.running_mean"], sd[f"{n}.running_var"], sd[f"{n}.weight"],
                            sd[f"{n}.bias"], False, 0.0, 1e-5)
    if deep:
        x = F.relu(bn(F.conv2d(x, sd["conv1.0.weight"], stride=2, padding=1), "conv1.1"))
        x = F.relu(bn(F.conv2d(x, sd["conv1.3.weight"], padding=1), "conv1.4"))
        x = F.conv2d(x, sd["conv1.6.weight"], padding=1)
    else:
        x = F.conv2d(x, sd["conv1.weight"], stride=2, padding=3)
    x = F.max_pool2d(F.relu(bn(x, "bn1")), 3, 2, 1)
    for i, n in enumerate(layers):
        for j in range(n):
            p, s = f"layer{i + 1}.{j}", (2 if (i and not j) else 1)
            if kind == "basic":
                out = F.relu(bn(F.conv2d(x, sd[f"{p}.conv1.weight"], stride=s, padding=1), f"{p}.bn1"))
                out = bn(F.conv2d(out, sd[f"{p}.conv2.weight"], padding=1), f"{p}.bn2")
            else:
                out = F.relu(bn(F.conv2d(x, sd[f"{p}.conv1.weight"]), f"{p}.bn1"))
                out = F.relu(bn(F.conv2d(out, sd[f"{p}.conv2.weight"], stride=s, padding=1,
                                         groups=groups), f"{p}.bn2"))
                out = bn(F.conv2d(out, sd[f"{p}.conv3.weight"]), f"{p}.bn3")
            short = x
            if deep and f"{p}.downsample.1.weight" in sd:
                if s > 1:
                    short = F.avg_pool2d(short, 2, 2, ceil_mode=True, count_include_pad=False)
                short = bn(F.conv2d(short, sd[f"{p}.downsample.1.weight"]), f"{p}.downsample.2")
            elif f"{p}.downsample.0.weight" in sd:
                short = bn(F.conv2d(short, sd[f"{p}.downsample.0.weight"], stride=s), f"{p}.downsample.1")
            x = F.relu(out + short)
    return F.linear(x.mean((2, 3)), sd["fc.weight"], sd["fc.bias"])


def _close(out, ref):
    return (out - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("preset", sorted({w.preset for w in REGISTRY.values()}))
def test_every_registry_architecture_loads_its_publishers_layout(preset, tmp_path):
    sd = publisher_state_dict(preset)
    for k in [k for k in sd if k.endswith("num_batches_tracked")][::2]:
        del sd[k]  # torchvision's V1 files predate this buffer: it must not be required
    torch.save(sd, tmp_path / "w.pth")
    model = rk.create_model(preset, checkpoint_path=tmp_path / "w.pth").eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert _close(model(x), reference_forward(preset, sd, x))


def _paddle_layout(sd):
    """The same weights as paddle.vision.models.resnet stores them: BN statistics as
    _mean/_variance, no num_batches_tracked, the fc weight as [in, out]; numpy arrays in a
    pickled dict (paddle.save)."""
    out = {}
    for k, v in sd.items():
        if k.endswith("num_batches_tracked"):
            continue
        k = k.replace("running_mean", "_mean").replace("running_var", "_variance")
        out[k] = (v.t() if k == "fc.weight" else v).numpy().astype(np.float32)
    return out


@pytest.mark.parametrize("preset", sorted({w.preset for w in REGISTRY.values()
                                            if w.publisher == "paddle"}))
def test_paddle_parameter_file_loads_with_names_mapped(tmp_path, preset):
    sd = publisher_state_dict(preset, num_classes=10)
    with open(tmp_path / "w.pdparams", "wb") as f:
        pickle.dump(_paddle_layout(sd), f, protocol=2)  # the oldest protocol paddle.save wrote
    model = rk.create_model(preset, num_classes=10, checkpoint_path=tmp_path / "w.pdparams")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert _close(model.eval()(x), reference_forward(preset, sd, x))
    # a file alone: its preset is recognised from the names and shapes
    model, info = P.load_source(tmp_path / "w.pdparams")
    assert model.cfg == rk.get_config(preset, num_classes=10) and len(info["classes"]) == 10


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("suffix", [".pdparams", ".pth", ".state.pt"])
def test_a_pickle_that_runs_code_is_refused(tmp_path, suffix):
    marker = tmp_path / "ran"
    path = tmp_path / f"evil{suffix}"
    with open(path, "wb") as f:
        pickle.dump({"conv1.weight": _RunsCode(marker)}, f)
    with pytest.raises(UserError):
        if suffix == ".state.pt":
            from resnetkit.weights import load_state
            load_state(path)
        else:
            rk.create_model("resnet18", checkpoint_path=path)
    assert not marker.exists()


def test_wrong_architecture_names_keys_and_the_lookalike(tmp_path):
    torch.save(publisher_state_dict("resnet34"), tmp_path / "r34.pth")
    with pytest.raises(UserError, match="first missing key .*looks like resnet34"):
        rk.create_model("resnet50", checkpoint_path=tmp_path / "r34.pth")
    (tmp_path / "x.ckpt").write_bytes(b"junk")
    with pytest.raises(UserError, match="unknown weights format"):
        rk.create_model("resnet18", checkpoint_path=tmp_path / "x.ckpt")


def test_new_head_and_one_channel_stem(tmp_path):
    sd = publisher_state_dict("resnet18")
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "r.pth")
    with pytest.warns(UserWarning, match="head starts fresh"):
        m = rk.create_model("resnet18", num_classes=7, in_chans=1, checkpoint_path=tmp_path / "r.pth")
    assert m.fc.weight.shape == (7, 512)
    assert torch.equal(m.conv1.weight, sd["conv1.weight"].sum(1, keepdim=True))
    assert torch.equal(m.layer4[1].conv2.weight, sd["layer4.1.conv2.weight"])
    backbone = rk.create_model("resnet18", features_only=True, checkpoint_path=tmp_path / "r.pth")
    assert torch.equal(backbone.layer1[0].conv1.weight, sd["layer1.0.conv1.weight"])


# ---- downloads from a local server ----------------------------------------------------------
class _Files(http.server.BaseHTTPRequestHandler):
    files: dict = {}

    def do_GET(self):
        body = self.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        data, truncate = body
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[:len(data) // 2] if truncate else data)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_download_checks_the_hash_and_leaves_nothing_behind(server, tmp_path):
    import hashlib
    httpd, base = server
    data = os.urandom(50_000)
    sha = hashlib.sha256(data).hexdigest()
    _Files.files = {"/good.pth": (data, False), "/cut.pth": (data, True)}
    got = dl.download(f"{base}/good.pth", "good.pth", sha[:8], "sha256_prefix", tmp_path, False)
    assert got.read_bytes() == data
    with pytest.raises(UserError, match="does not match its published sha256"):
        dl.download(f"{base}/good.pth", "other.pth", "0" * 64, "sha256", tmp_path, False)
    with pytest.raises(UserError):
        dl.download(f"{base}/cut.pth", "cut.pth", sha, "sha256", tmp_path, False)
    with pytest.raises(UserError, match="HTTP 404.*fetch it by hand and put it at"):
        dl.download(f"{base}/missing.pth", "missing.pth", None, None, tmp_path, False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.pth"]
    httpd.shutdown()
    httpd.server_close()
    # the server is gone: the cached, checked file is still served; anything else says where
    assert dl.download(f"{base}/good.pth", "good.pth", sha[:8], "sha256_prefix", tmp_path, False) == got
    with pytest.raises(UserError, match="could not download .*fetch it by hand"):
        dl.download(f"{base}/new.pth", "new.pth", None, None, tmp_path, False)


def test_pretrained_tag_downloads_once_and_loads(server, tmp_path, monkeypatch):
    import hashlib
    import io
    _, base = server
    sd = publisher_state_dict("resnet18")
    buf = io.BytesIO()
    torch.save(sd, buf)
    data = buf.getvalue()
    _Files.files = {"/resnet18-test.pth": (data, False)}
    w = Weights("resnet18.test_in1k", "resnet18", "torchvision", f"{base}/resnet18-test.pth",
                hashlib.sha256(data).hexdigest(), "sha256", "pth", 69.758, 89.078, "test",
                "BSD-3-Clause", resize=256, default=True)
    monkeypatch.setitem(REGISTRY, w.tag, w)
    monkeypatch.setenv("RESNETKIT_CACHE", str(tmp_path))
    m = rk.create_model("resnet18", pretrained="resnet18.test_in1k").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert _close(m(x), reference_forward("resnet18", sd, x))
    model, info = P.load_source("resnet18.test_in1k")
    assert len(info["classes"]) == 1000 and info["preprocess"]["resize"] == 256
    with pytest.raises(UserError, match="unknown weights tag"):
        rk.create_model("resnet18", pretrained="resnet18.nope")


# ---- the publishers' eval preprocessing ---------------------------------------------------
def _photo(tmp_path, w=300, h=200):
    """A real image file: Fashion-MNIST test images tiled into a w x h RGB JPEG."""
    from resnetkit.data import load_dataset
    d = load_dataset("fashion-mnist", "test")
    tiles = d.images[:((w // 28) + 1) * ((h // 28) + 1), 0].numpy()
    rows = [np.concatenate(list(tiles[r * ((w // 28) + 1):(r + 1) * ((w // 28) + 1)]), 1)
            for r in range((h // 28) + 1)]
    arr = np.concatenate(rows, 0)[:h, :w]
    rgb = np.stack([arr, 255 - arr, arr // 2], -1).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "photo.jpg", quality=95)
    return tmp_path / "photo.jpg"


@pytest.mark.parametrize("resize,crop,interp", [(256, 224, "bilinear"),   # torchvision V1
                                                 (232, 224, "bilinear"),   # torchvision V2
                                                 (int(224 / 0.95), 224, "bicubic")])  # timm
def test_eval_transform_matches_the_publishers_recipe(tmp_path, resize, crop, interp):
    from resnetkit.data import load_image
    path = _photo(tmp_path)
    ours = load_image(path, crop, 3, resize, interp).permute(1, 2, 0).numpy()
    # torchvision: Resize(resize) keeps the aspect ratio with the long side truncated, then
    # CenterCrop with the offset rounded
    img = Image.open(path).convert("RGB")
    w, h = img.size
    img = img.resize((int(resize * w / h), resize) if w > h else (resize, int(resize * h / w)),
                     Image.BICUBIC if interp == "bicubic" else Image.BILINEAR)
    left, top = int(round((img.width - crop) / 2.0)), int(round((img.height - crop) / 2.0))
    ref = np.asarray(img.crop((left, top, left + crop, top + crop)))
    assert np.array_equal(ours, ref)


PADDLE_SCRIPT = """
import sys, numpy as np, paddle
paddle.seed(0)
rs = np.random.RandomState(1)
m = paddle.vision.models.resnet18(num_classes=10)
for name, p in m.state_dict().items():  # BN statistics and affine away from their defaults
    if name.endswith("_variance") or (".bn" in name or "bn1" in name or "downsample.1" in name) \\
            and name.endswith("weight"):
        p.set_value(rs.uniform(0.5, 1.5, p.shape).astype("float32"))
    elif name.endswith(("_mean", "bias")):
        p.set_value((rs.randn(*p.shape) * 0.1).astype("float32"))
m.eval()
x = rs.randn(2, 3, 64, 64).astype("float32")
paddle.save(m.state_dict(), sys.argv[1] + "/r18.pdparams")
np.save(sys.argv[1] + "/x.npy", x)
np.save(sys.argv[1] + "/y.npy", m(paddle.to_tensor(x)).numpy())
"""


@pytest.mark.skipif(__import__("importlib.util").util.find_spec("paddle") is None,
                    reason="needs paddlepaddle (pip install 'resnetkit[paddle]')")
def test_a_file_written_by_paddle_itself_gives_paddles_logits(tmp_path):
    import subprocess
    import sys
    # paddle runs in its own process: it and torch each bring their own native libraries
    subprocess.run([sys.executable, "-c", PADDLE_SCRIPT, str(tmp_path)], check=True,
                   capture_output=True, timeout=300)
    model = rk.create_model("resnet18", num_classes=10, checkpoint_path=tmp_path / "r18.pdparams")
    x, ref = torch.from_numpy(np.load(tmp_path / "x.npy")), torch.from_numpy(np.load(tmp_path / "y.npy"))
    with torch.no_grad():
        assert _close(model.eval()(x), ref)


def test_convert_then_predict_and_export_a_foreign_file(tmp_path, capsys):
    from resnetkit.cli import main
    sd = publisher_state_dict("resnet18")
    torch.save(sd, tmp_path / "resnet18-test.pth")
    out = tmp_path / "r18.safetensors"
    assert main(["weights", "convert", str(tmp_path / "resnet18-test.pth"), "-o", str(out)]) == 0
    photo = _photo(tmp_path)
    assert main(["predict", str(out), str(photo), "--top-k", "2", "--json"]) == 0
    import json
    res = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    # the class the publisher's forward gives on the publisher's eval transform of the file
    from resnetkit.data import load_image
    x = load_image(photo, 224, 3, 256, "bilinear").float()[None] / 255
    x = (x - torch.tensor(P.IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(P.IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        best = reference_forward("resnet18", sd, x).argmax(1).item()
    assert res[0]["top"][0]["index"] == best
    assert res[0]["top"][0]["class"] == P.imagenet_classes()[best]
    assert main(["predict", str(tmp_path / "resnet18-test.pth"), str(photo), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["top"][0]["index"] == best
    assert main(["weights", "list", "resnet50*", "--json"]) == 0
    tags = {w["tag"] for w in json.loads(capsys.readouterr().out)}
    assert {"resnet50.tv1_in1k", "resnet50.tv2_in1k"} <= tags
    assert main(["weights", "download"]) == 2


def test_weights_list_takes_an_architecture_name_and_says_when_nothing_matches(capsys):
    import json

    from resnetkit.cli import main
    from resnetkit.weights.registry import list_weights
    # the registry's resnet50 entries: torchvision's V1 and V2, timm's a1, Paddle's
    tags = {w.tag for w in list_weights("resnet50")}
    assert tags == {"resnet50.tv1_in1k", "resnet50.tv2_in1k", "resnet50.a1_in1k",
                    "resnet50.paddle_in1k"}
    assert all(w.preset == "resnet50" for w in list_weights("resnet50"))
    assert {w.tag for w in list_weights("resnet50.*")} == tags
    assert main(["weights", "list", "resnet50", "--json"]) == 0
    assert {r["tag"] for r in json.loads(capsys.readouterr().out)} == tags
    assert main(["weights", "list", "nothing*"]) == 2
    assert "no published weights match 'nothing*'" in capsys.readouterr().err
