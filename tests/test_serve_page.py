"""The page at / in a real headless Chromium (Debian's `chromium`, driven by Playwright):
upload a Fashion-MNIST test image, read the top class off the page, compare it with the
model's prediction through the Python API, and check the screenshot is not blank; then turn
the "why?" switch on and compare the heatmap laid over the image with Grad-CAM computed here,
and off again."""
import base64
import io
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("litserve")
playwright = pytest.importorskip("playwright.sync_api", reason="pip install 'resnetkit[dev]'")

from serve_helpers import CLASSES, Server, write_checkpoint  # noqa: E402

from resnetkit.infer import predict  # noqa: E402

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def drive_page(url: str, image: Path, screenshot: Path, key: str | None = None) -> dict:
    """Open the page (giving it `key` where the server needs one), choose `image` in its file
    picker, wait for the bars; returns the top
    class read off the page, the classes of the bars and the model card's facts."""
    with playwright.sync_playwright() as p, tempfile.TemporaryDirectory() as profile:
        browser = p.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=FLAGS,
            viewport={"width": 1280, "height": 900})
        try:
            page = browser.new_page()
            page.goto(url)
            if key:  # the page asks for the key, then sends it on each of its requests
                page.wait_for_selector("#keyform:not([hidden])", timeout=30_000)
                page.fill("#key", key)
                page.click("#keyform button")
            page.wait_for_selector("#facts dt", timeout=30_000)  # the model card from /metadata
            subtitle = page.inner_text("#subtitle")
            page.set_input_files("#file", str(image))
            page.wait_for_selector("#top-class", timeout=60_000)
            page.wait_for_selector("#diagram svg", timeout=10_000)
            out = {"top": page.inner_text("#top-class"),
                   "bars": [r.get_attribute("data-cls") for r in page.query_selector_all("#bars .row")],
                   "facts": page.inner_text("#facts"),
                   "status": page.inner_text("#status"), "subtitle": subtitle}
            page.screenshot(path=str(screenshot), full_page=True)
            page.check("#why")  # asks /explain for the same file
            page.wait_for_selector("#overlay:not([hidden])", timeout=60_000)
            page.wait_for_function("document.getElementById('heat').naturalWidth > 0")
            out["heat"] = page.get_attribute("#heat", "src")
            out["view"] = page.get_attribute("#view", "src")
            out["note"] = page.inner_text("#whynote")
            out["why_top"] = page.inner_text("#top-class")
            out["overlay_box"] = page.locator("#overlay").bounding_box()
            out["preview_hidden"] = not page.is_visible("#preview")
            page.screenshot(path=str(screenshot.with_suffix(".why.png")), full_page=True)
            page.uncheck("#why")
            page.wait_for_selector("#overlay", state="hidden", timeout=10_000)
            out["preview_back"] = page.is_visible("#preview")
            return out
        finally:
            browser.close()


def fashion_test_image(folder: Path, index: int = 0) -> Path:
    from resnetkit.data import load_dataset
    ds = load_dataset("fashion-mnist", "test")
    path = folder / f"fashion-test-{index}.png"
    Image.fromarray(ds.images[index, 0].numpy()).save(path)
    return path


def check_page(model: Path, folder: Path, screenshot: Path, index: int = 0) -> dict:
    """Serve `model`, drive the page with Fashion-MNIST test image `index`; asserts and
    returns what the page showed."""
    image = fashion_test_image(folder, index)
    want = predict(model, [image], top_k=5)[0]["top"]
    key = "a-key-for-the-page-test-0123"
    server = Server(model, "--api-key", key)
    try:
        shown = drive_page(server.url, image, screenshot, key)
    finally:
        server.close()
    # the model's name and version, never the server's path to it
    assert shown["subtitle"].startswith(f"{model.stem} version 1"), shown["subtitle"]
    assert str(model.parent) not in shown["subtitle"]
    assert shown["top"] == want[0]["class"], (shown, want)
    assert shown["bars"] == [t["class"] for t in want]
    assert "resnet20" in shown["facts"] and "20 = 1 stem conv" in shown["facts"]
    pixels = np.asarray(Image.open(screenshot).convert("L"), dtype=np.float64)
    assert pixels.std() > 10, "the screenshot is blank"
    check_why(model, image, shown, screenshot)
    return shown


def data_url_image(url: str) -> np.ndarray:
    head, _, data = url.partition(",")
    assert head == "data:image/png;base64", head
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))))


def check_why(model: Path, image: Path, shown: dict, screenshot: Path) -> None:
    """The switch's heatmap is Grad-CAM of the top class, computed here from the checkpoint
    (explain.grad_cam, itself checked against hooks in test_explain), drawn with its alpha
    growing as the square root of the normalised heat, over the image as the model saw it."""
    import torch

    from resnetkit.data.preprocess import load_images, model_input
    from resnetkit.explain import grad_cam
    from resnetkit.infer import open_source
    src = open_source(model)
    raw = load_images([image], src.meta.preprocess)
    # the class the page shows (the served engine's first, which on a bf16 CPU may differ
    # from fp32's where two classes nearly tie)
    target = CLASSES.index(shown["top"])
    cam = grad_cam(src.model, model_input(raw, src.meta.preprocess), target=target)[0]
    heat, view = data_url_image(shown["heat"]), data_url_image(shown["view"])
    assert heat.shape == (28, 28, 4) and view.shape == (28, 28)
    np.testing.assert_array_equal(view, raw[0, 0].numpy())
    want = 255 * 0.7 * torch.sqrt(cam.clamp(min=0) / cam.max()).numpy()
    assert cam.max() > 0 and np.abs(heat[..., 3] - want).max() <= 1.0
    assert shown["why_top"] == shown["top"] and f'"{shown["top"]}" at layer3' in shown["note"]
    assert shown["preview_hidden"] and shown["preview_back"]
    box = shown["overlay_box"]
    assert box["width"] == box["height"] == 162  # 160 px and its border
    # the page with the heatmap differs from the page without it, where the overlay is
    before = np.asarray(Image.open(screenshot).convert("RGB"), dtype=np.int16)
    after = np.asarray(Image.open(screenshot.with_suffix(".why.png")).convert("RGB"), dtype=np.int16)
    x, y = int(box["x"]), int(box["y"])
    region = (slice(y, y + 160), slice(x, x + 160))
    assert before.shape == after.shape and np.abs(after[region] - before[region]).mean() > 5


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium: apt-get install chromium (make test "
                                             "installs it where apt is available)")
def test_page_shows_the_models_top_class(tmp_path):
    model = write_checkpoint(tmp_path / "r20.safetensors")
    check_page(model, tmp_path, tmp_path / "page.png")
