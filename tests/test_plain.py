"""Plain networks (the paper's baselines without shortcuts) and receptive fields. Counts and
fields are computed here by hand from the layer shapes, not read from the code."""
import pytest
import torch

import resnetkit as rk
from resnetkit.analysis.describe import describe, render_describe
from resnetkit.analysis.summary import compare
from resnetkit.errors import UserError


def _conv(cin, cout, k):
    return cin * cout * k * k


def _bn(c):
    return 2 * c


def _plain_imagenet_params(layers, widths=(64, 128, 256, 512), classes=1000):
    """BasicBlock nets without shortcuts: stem, two 3x3 convs + BN per block, fc."""
    n = _conv(3, 64, 7) + _bn(64)
    cin = 64
    for blocks, w in zip(layers, widths):
        for _ in range(blocks):
            n += _conv(cin, w, 3) + _bn(w) + _conv(w, w, 3) + _bn(w)
            cin = w
    return n + cin * classes + classes


def _plain_cifar_params(n_blocks, classes=10):
    n = _conv(3, 16, 3) + _bn(16)
    cin = 16
    for w in (16, 32, 64):
        for _ in range(n_blocks):
            n += _conv(cin, w, 3) + _bn(w) + _conv(w, w, 3) + _bn(w)
            cin = w
    return n + cin * classes + classes


def _params(name):
    return sum(p.numel() for p in rk.create_model(name).parameters())


def test_plain_presets_have_their_twins_parameters_less_the_projections():
    assert _params("plain18") == _plain_imagenet_params((2, 2, 2, 2))
    assert _params("plain34") == _plain_imagenet_params((3, 4, 6, 3))
    # the ResNet twin adds one 1x1 projection + BN at each of stages 2-4 (REFERENCE.md
    # section 1: resnet18 11,689,512 and resnet34 21,797,672 parameters)
    projections = sum(_conv(a, b, 1) + _bn(b) for a, b in ((64, 128), (128, 256), (256, 512)))
    assert _plain_imagenet_params((2, 2, 2, 2)) + projections == 11_689_512
    assert _plain_imagenet_params((3, 4, 6, 3)) + projections == 21_797_672
    for n in (3, 5, 7, 9, 18):
        assert _params(f"plain{6 * n + 2}") == _plain_cifar_params(n)
        # option A shortcuts have no parameters: the CIFAR twins count the same
        assert _params(f"resnet{6 * n + 2}") == _plain_cifar_params(n)
    assert round(_plain_cifar_params(3) / 1e6, 2) == 0.27  # the paper's table 6, ResNet-20


def test_a_plain_block_outputs_relu_of_its_branch_and_a_residual_one_adds_its_input():
    torch.manual_seed(0)
    plain = rk.create_model("plain20").eval().layer1[1]
    res = rk.create_model("resnet20").eval().layer1[1]
    res.load_state_dict(plain.state_dict())
    x = torch.randn(2, 16, 8, 8)
    # the branch F(x) = bn2(conv2(relu(bn1(conv1(x))))), computed here from the parts
    f = plain.bn2(plain.conv2(torch.relu(plain.bn1(plain.conv1(x)))))
    with torch.no_grad():
        torch.testing.assert_close(plain(x), torch.relu(f))
        torch.testing.assert_close(res(x), torch.relu(f + x))
        # with the branch silenced, a residual block passes its (non-negative) input on,
        # a plain block outputs zeros
        for b in (plain, res):
            torch.nn.init.zeros_(b.bn2.weight)
            torch.nn.init.zeros_(b.bn2.bias)
        xp = x.relu()
        assert torch.equal(res(xp), xp) and torch.equal(plain(xp), torch.zeros_like(xp))


def test_options_that_mean_nothing_without_shortcuts_are_refused():
    for kw, field in ((dict(zero_init_residual=True), "zero_init_residual"),
                      (dict(avg_down=True), "avg_down"), (dict(drop_path_rate=0.1), "drop_path_rate"),
                      (dict(block="preact_basic"), "shortcut")):
        with pytest.raises(UserError, match=rf"ResNetConfig\.{field}=.*is invalid"):
            rk.create_model("plain34", **kw)


def test_describe_counts_depth_without_shortcuts():
    walk = describe("plain34")
    assert walk["depth"]["total"] == 34 and walk["depth"]["projection_convs"] == 0
    assert walk["depth"]["text"] == ("34 = 1 stem conv + 2 convs x 16 blocks + 1 fc; no "
                                     "shortcuts (a plain network)")
    assert {b["shortcut"]["kind"] for s in walk["stages"] for b in s["blocks"]} == {"none"}
    assert "shortcut  none" in render_describe(walk)
    # the same walk of sizes as ResNet-34's (REFERENCE.md section 6)
    assert [s["blocks"][-1]["out"] for s in walk["stages"]] == \
        [[64, 56, 56], [128, 28, 28], [256, 14, 14], [512, 7, 7]]


def test_compare_shows_what_the_shortcuts_cost():
    plain, res = compare(["plain34", "resnet34"], memory=False)
    assert res["params"] - plain["params"] == 173_824  # three projections + their BN
    assert plain["depth"] == res["depth"] == 34
    # the projections' MACs: 1x1 convs at 28, 14 and 7 (the outputs' sizes)
    assert res["macs"] - plain["macs"] == 64 * 128 * 28 ** 2 + 128 * 256 * 14 ** 2 + 256 * 512 * 7 ** 2


def test_diagram_of_a_plain_net_has_no_shortcut_lines(tmp_path):
    from resnetkit.analysis.diagram import diagram
    svg = diagram(describe("plain20", 32), tmp_path / "p.svg").read_text()
    res = diagram(describe("resnet20", 32), tmp_path / "r.svg").read_text()
    assert "identity" in res and "zero-pad" in res and "<path" in res
    assert "identity" not in svg and "zero-pad" not in svg and "<path" not in svg
    assert "no shortcuts (a plain network)" in svg


# Receptive fields by hand (r += (k - 1) * j, j *= s, along the convs of each block):
# ResNet-18: conv1 7/2 -> 7, j 2; max-pool 3/2 -> 11, j 4; layer1 4 convs +8 -> 43;
# layer2 3x3/2 +8 -> 51, j 8, 3 more +16 -> 99; layer3 +16 -> 115, j 16, +96 -> 211;
# layer4 +32 -> 243, j 32, +192 -> 435.
# ResNet-50 v1.5 (stride on the 3x3): layer1 3 x (+8) -> 35; layer2 +8 (3x3/2 at j 4) -> 43,
# j 8, 3 x 16 -> 91; layer3 +16 -> 107, j 16, 5 x 32 -> 267; layer4 +32 -> 299, 2 x 64 -> 427.
# v1 (stride on the first 1x1, so the 3x3 already sees the doubled jump): layer2 +16 -> 51,
# +48 -> 99; layer3 +32 -> 131, +160 -> 291; layer4 +64 -> 355, +128 -> 483 (Araujo et al.
# give 483 for ResNet-50).
# ResNet-20 (3x3 stem, stride 1): 3 + 6 x 2 -> 15; layer2 +2 (3x3/2 at j 1) -> 17, j 2,
# 5 x 4 -> 37; layer3 +4 -> 41, j 4, 5 x 8 -> 81.
@pytest.mark.parametrize("name,fields", [
    ("resnet18", [43, 99, 211, 435]), ("resnet50", [35, 91, 267, 427]),
    ("resnet50_v1", [35, 99, 291, 483]), ("resnet20", [15, 37, 81])])
def test_receptive_fields_match_a_count_by_hand(name, fields):
    walk = describe(name, 32 if name == "resnet20" else 224)
    assert [s["receptive_field"] for s in walk["stages"]] == fields
    strides = [4, 8, 16, 32] if name != "resnet20" else [1, 2, 4]
    assert [s["effective_stride"] for s in walk["stages"]] == strides
    # the same at any input size: the theoretical field does not depend on it
    assert [s["receptive_field"] for s in describe(name, 64 if name == "resnet20" else 512)
            ["stages"]] == fields


def test_summary_shows_the_field_per_layer():
    from resnetkit.analysis.summary import summary
    rows = {r["name"]: r for r in summary("resnet18", memory=False, depth=2)["layers"]}
    # by hand as above: each basic block adds 2 x 2 x jump
    assert (rows["conv1"]["receptive_field"], rows["conv1"]["effective_stride"]) == (7, 2)
    assert rows["maxpool"]["receptive_field"] == 11
    assert [rows[f"layer1.{i}"]["receptive_field"] for i in (0, 1)] == [27, 43]
    assert (rows["layer2.0"]["receptive_field"], rows["layer2.0"]["effective_stride"]) == (67, 8)
    assert rows["bn1"]["receptive_field"] is None and rows["fc"]["receptive_field"] is None
