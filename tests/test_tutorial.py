"""docs/tutorial.ipynb runs top to bottom and prints the seed notes' figures.

The notebook is executed with nbclient in a fresh python3 kernel, from the docs folder (as
the documentation site runs it). Every figure asserted here is taken from REFERENCE.md,
the project's reference figures (the section is named beside it), not from the notebook's
own output."""
import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("captum")      # section 8, Grad-CAM
pytest.importorskip("matplotlib")  # section 8, the figure

# one process runs this file's tests, so the notebook runs once (see pyproject)
pytestmark = pytest.mark.xdist_group("test_tutorial")

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
NOTEBOOK = DOCS / "tutorial.ipynb"
CELL_TIMEOUT_S = 120  # the whole notebook takes well under a minute on 2 cores


@pytest.fixture(scope="module")
def text():
    """Everything the executed notebook printed (stdout and stderr), in order."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(DOCS)}}).execute()
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            if o.output_type == "stream":
                out.append(o.text)
            elif o.output_type in ("execute_result", "display_data"):
                out.append(o.get("data", {}).get("text/plain", ""))
    return "".join(out)


def test_the_notebook_is_saved_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)
    assert nb.metadata.kernelspec.name == "python3"


def test_parameter_counts(text):
    # REFERENCE.md section 1
    assert "ResNet-34: 21,797,672 parameters" in text
    assert "ResNet-50: 25,557,032 parameters" in text
    assert "53,120" in text and "25,610,152" in text  # BN running stats; Paddle's total


def _walk(text, title):
    """{module: (size in, size out)} of the walk printed under `title`."""
    block = text.split(title + "\n", 1)[1].split("\n\n")[0]
    rows = {}
    for line in block.splitlines():
        m = re.match(r"\s+(\w+)\s.*?(\d+) -> (\d+)\s+model: \((.*)\)", line)
        if not m:
            break
        rows[m[1]] = (int(m[2]), int(m[3]), tuple(int(v) for v in m[4].split(",")))
    return rows


def test_the_walk_at_224_and_512(text):
    # REFERENCE.md section 6: conv1 224 -> 112, max-pool 112 -> 56, conv2_x at 56x56,
    # conv3_x 56 -> 28, conv4_x 28 -> 14, conv5_x 14 -> 7; at 512: 256, 128, 128, 64, 32, 16
    expect = {224: [(224, 112), (112, 56), (56, 56), (56, 28), (28, 14), (14, 7)],
              512: [(512, 256), (256, 128), (128, 128), (128, 64), (64, 32), (32, 16)]}
    modules = ["conv1", "maxpool", "layer1", "layer2", "layer3", "layer4"]
    for name, size, channels in (("resnet34", 224, (64, 64, 64, 128, 256, 512)),
                                 ("resnet50", 224, (64, 64, 256, 512, 1024, 2048)),
                                 ("resnet50", 512, (64, 64, 256, 512, 1024, 2048))):
        rows = _walk(text, f"{name} at {size}x{size}")
        for module, (n_in, n_out), ch in zip(modules, expect[size], channels):
            # by hand, and the model's own shape
            assert rows[module] == (n_in, n_out, (1, ch, n_out, n_out)), (name, size, module)
        last = expect[size][-1][1]
        assert rows["layer4"][2][-1] == last  # average pool 7x7 (16x16) -> 1x1
    # conv3_x block 1 of ResNet-50 at 512: 1x1 256->128 at 128x128, 3x3 128->128 s2
    # 128 -> 64, 1x1 128->512 at 64x64, projection 1x1 256->512 stride 2
    assert re.search(r"conv1\s+1x1 256->128\s+s1 p0\s+128x128 -> 128x128", text)
    assert re.search(r"conv2\s+3x3 128->128\s+s2 p1\s+128x128 -> 64x64", text)
    assert re.search(r"conv3\s+1x1 128->512\s+s1 p0\s+64x64 -> 64x64", text)
    assert re.search(r"downsample.0\s+1x1 256->512\s+s2 p0\s+128x128 -> 64x64", text)
    # max-pool padding 0: 112 -> 55 -> 28 at 224, 256 -> 127 -> 64 at 512
    rows = _walk(text, "resnet50 at 224x224, maxpool_padding=0")
    assert rows["maxpool"][:2] == (112, 55) and rows["layer2"][:2] == (55, 28)
    rows = _walk(text, "resnet50 at 512x512, maxpool_padding=0")
    assert rows["maxpool"][:2] == (256, 127) and rows["layer2"][:2] == (127, 64)


def test_depth_accounting(text):
    # REFERENCE.md section 6: 34 = 1 + 2 x (3+4+6+3) + 1, 50 = 1 + 3 x 16 + 1
    assert "34 = 1 + 2 x 16 + 1" in text
    assert "50 = 1 + 3 x 16 + 1" in text
    # section 1: the CIFAR nets have depth 6n + 2, n = 3 for ResNet-20
    assert "20 = 1 + 2 x 9 + 1" in text


def test_what_a_bottleneck_saves(text):
    # REFERENCE.md section 6, per image at 56x56
    basic = 2 * 64 * 64 * 9 * 56 ** 2
    bottleneck = (256 * 64 + 64 * 64 * 9 + 64 * 256) * 56 ** 2
    assert f"{basic:,} MACs" in text and f"{bottleneck:,} MACs" in text
    assert "(73,728 - 69,632) x 3,136 = 12,845,056 MACs" in text
    # the parameter comparison at 256 channels
    assert "1,179,648" in text and "bottleneck 69,632" in text


def test_shortcuts_and_v1_against_v1_5(text):
    # REFERENCE.md section 2: ResNet-34's MACs; ResNet-50 v1.5 and v1
    assert re.search(r"resnet34\s+depth 34\s+21,797,672 parameters\s+3,663,761,408 MACs", text)
    assert "resnet50 (v1.5): 25,557,032 parameters, 4,089,184,256 MACs" in text
    assert "resnet50_v1:     25,557,032 parameters, 3,857,973,248 MACs" in text
    assert "v1.5 - v1 counted: 231,211,008 MACs" in text
    # section 6: option B's projections of ResNet-34 are 1x1 64->128, 128->256 and
    # 256->512, each with a BN (weight and bias); option A (and a plain net) has none
    projections = 64 * 128 + 128 * 256 + 256 * 512 + 2 * (128 + 256 + 512)
    assert f"B - A = {projections:,} parameters" in text
    assert re.search(rf"plain34\s+depth 34\s+{21_797_672 - projections:,} parameters", text)


def test_degradation(text):
    # the tiny run prints its training errors
    for name in ("plain20", "resnet20"):
        assert re.search(rf"{name}\s+training error by epoch: \d+\.\d%, \d+\.\d%", text)
    # the committed run: REFERENCE.md section 9 (figure 6), the deeper plain net has the
    # higher training error
    last = dict(re.findall(r"^(plain\d+|resnet\d+)\s+14\s+(\d+\.\d+)%", text, re.MULTILINE))
    assert set(last) == {"plain20", "plain56", "resnet20", "resnet56"}
    assert float(last["plain56"]) > float(last["plain20"])


def test_finetune_and_grad_cam(text):
    assert "backbone copied from the pretrained run: True; new head: 5 -> 3 classes" in text
    assert re.search(r"fine-tuned on 120 images of \['Sandal', 'Sneaker', 'Ankle boot'\]: "
                     r"test top-1 \d+\.\d%", text)
    # REFERENCE.md section 4: Fashion-MNIST images are 28x28 grayscale
    assert "input (4, 1, 28, 28) -> heatmaps (4, 28, 28)" in text
    assert text.count("<IPython.core.display.Image object>") == 2  # the two figures


def test_nothing_is_left_behind(text):
    work = Path(re.search(r"run folders go to (\S+)", text)[1])
    assert ROOT not in work.parents
    assert f"removed {work}" in text and not work.exists()
