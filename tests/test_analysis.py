"""describe / summary / flops / compare / diagram against REFERENCE.md and hand arithmetic."""
import json
import math
import subprocess
import sys
from importlib import resources

import jsonschema
import pytest

import resnetkit as rk
from resnetkit.analysis.describe import describe, render_describe
from resnetkit.analysis.diagram import diagram
from resnetkit.analysis.summary import block_cost, compare, flops, summary
from resnetkit.analysis.trace import build_model, trace
from resnetkit.cli import main
from resnetkit.errors import UserError

# REFERENCE.md section 2: (v1.5, v1) MACs at 224 (and ResNet-50 at 512).
MACS = {
    "resnet18": (1_814_073_344, 1_814_073_344),
    "resnet34": (3_663_761_408, 3_663_761_408),
    "resnet50": (4_089_184_256, 3_857_973_248),
    "resnet101": (7_801_405_440, 7_570_194_432),
    "resnet152": (11_513_626_624, 11_282_415_616),
    "resnext50_32x4d": (4_230_479_872, 3_768_057_856),
    "wide_resnet50_2": (11_398_021_120, 10_935_599_104),
}
PAPER = {"resnet18": 1.8, "resnet34": 3.6, "resnet50": 3.8, "resnet101": 7.6, "resnet152": 11.3}


@pytest.mark.parametrize("name", sorted(MACS))
def test_macs_match_reference_v15_and_v1(name):
    v15, v1 = MACS[name]
    assert flops(name)["macs"] == v15
    kw = {"stride_in_1x1": True} if rk.PRESETS[name].is_bottleneck else {}
    got_v1 = flops(name, **kw)["macs"]
    assert got_v1 == v1
    if name in PAPER:  # the paper's table: v1 to two significant figures, truncated or rounded
        g = got_v1 / 1e9
        assert PAPER[name] in (math.floor(g * 10) / 10, round(g, 1))


def test_resnet50_at_512_and_v1_difference():
    assert flops("resnet50", 512)["macs"] == 21_355_249_664
    assert flops("resnet50", 512, stride_in_1x1=True)["macs"] == 20_147_290_112
    for n in ("resnet50", "resnet101", "resnet152"):
        assert MACS[n][0] - MACS[n][1] == 231_211_008


def test_resnet50_op_breakdown_matches_reference():
    k = flops("resnet50")["by_kind"]
    assert (k["bn"], k["relu"], k["maxpool"], k["avgpool"], k["add"], k["fc_bias"]) == \
        (11_113_984, 9_608_704, 802_816, 100_352, 5_519_360, 1_000)
    f = flops("resnet50")
    assert sum(v["conv"] + v["fc"] for v in f["per_stage"].values()) == f["macs"]


def test_block_comparison_of_the_seed_notes():
    basic, bottle = block_cost("basic:64", 56), block_cost("bottleneck:256", 56)
    assert basic["macs"] == 2 * 64 * 64 * 9 * 56 ** 2
    assert bottle["macs"] == (256 * 64 + 64 * 64 * 9 + 64 * 256) * 56 ** 2
    assert basic["macs"] - bottle["macs"] == 12_845_056 == (73_728 - 69_632) * 3_136
    assert bottle["conv_weights"] == 69_632
    assert block_cost("basic:256")["conv_weights"] == 1_179_648


def test_paddle_single_block_seed():
    b = block_cost("basic:64->128/2", 224)
    assert [c["weights"] for c in b["convs"]] == [73_728, 147_456, 8_192]
    assert b["params"] == 229_376 + 3 * 2 * 128
    bb = block_cost("bottleneck:64->128/2", 224)
    assert [c["weights"] for c in bb["convs"]] == [2_048, 9_216, 4_096, 8_192]


@pytest.mark.parametrize("spec", ["basic", "basic:x", "dense:64", "bottleneck:64->130"])
def test_bad_block_spec(spec):
    with pytest.raises(UserError, match="block spec"):
        block_cost(spec)


def test_summary_params_buffers_and_memory_by_independent_arithmetic():
    s = summary("resnet50")
    t = s["totals"]
    bn_chs = 26_560  # REFERENCE.md section 1
    assert t["params"] == 25_557_032 and t["trainable"] == t["params"]
    assert t["bn_running_stats"] == 2 * bn_chs == 53_120
    assert t["buffers"] == 2 * bn_chs + 53  # + one num_batches_tracked per BN (53 BN layers)
    assert "25,610,152" in s["reconcile"] and "25,557,032" in s["reconcile"]
    m = s["memory"]
    # torchinfo's convention, REFERENCE.md section 2: 0.60 / 177.83 / 102.23 / 280.66 MB
    assert round(m["input_mb"], 2) == 0.60 and round(m["params_mb"], 2) == 102.23
    assert round(m["torchinfo_pass_mb"], 2) == 177.83 and round(m["torchinfo_total_mb"], 2) == 280.66
    assert m["params_mb"] == 25_557_032 * 4 / 1e6
    # saved activations: at least the input of every conv is kept (fp32)
    recs = trace(build_model("resnet50"), (224, 224))
    main_conv_inputs = sum(math.prod(r.in_shape) for r in recs if r.kind == "conv")
    assert m["saved_activations_mb"] * 1e6 > main_conv_inputs * 4 * 0.5
    s4 = summary("resnet50", batch=4)
    assert s4["memory"]["saved_activations_mb"] == pytest.approx(4 * m["saved_activations_mb"])


def test_summary_frozen_parameters():
    model = rk.create_model("resnet18", num_classes=10)
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith("fc.")
    s = summary(model, 64, memory=False)
    assert s["totals"]["trainable"] == 512 * 10 + 10
    assert s["totals"]["non_trainable"] == s["totals"]["params"] - 5_130


def test_summary_depth_grouping_sums_up():
    full = summary("resnet18", depth=None, memory=False)
    top = summary("resnet18", depth=1, memory=False)
    assert [r["name"] for r in top["layers"]][:4] == ["conv1", "bn1", "relu", "maxpool"]
    assert sum(r["params"] for r in top["layers"]) == sum(r["params"] for r in full["layers"]) \
        == 11_689_512
    assert sum(r["macs"] for r in top["layers"]) == 1_814_073_344


def test_walkthrough_resnet34_seed_sizes():
    w = describe("resnet34")
    conv1, pool = w["stem"]
    assert (conv1["kernel"], conv1["stride"], conv1["padding"], conv1["in_hw"], conv1["out_hw"]) \
        == ([7, 7], 2, 3, [224, 224], [112, 112])
    assert (pool["kernel"], pool["stride"], pool["padding"], pool["out_hw"]) == ([3, 3], 2, 1, [56, 56])
    st = w["stages"]
    assert [len(s["blocks"]) for s in st] == [3, 4, 6, 3]
    assert all(b["shortcut"]["kind"] == "identity" for b in st[0]["blocks"])
    b = st[1]["blocks"][0]
    assert [(o["in_ch"], o["out_ch"], o["stride"], o["in_hw"][0], o["out_hw"][0]) for o in b["ops"]] \
        == [(64, 128, 2, 56, 28), (128, 128, 1, 28, 28)]
    assert b["shortcut"] | {} == {**b["shortcut"], "kind": "projection", "in_ch": 64, "out_ch": 128, "stride": 2}
    assert [s["blocks"][0]["out"] for s in st] == [[64, 56, 56], [128, 28, 28], [256, 14, 14], [512, 7, 7]]
    assert w["head"] == {"avgpool": {"in_hw": [7, 7], "out_hw": [1, 1]}, "fc": {"in": 512, "out": 1000}}
    assert w["depth"]["total"] == 34 and w["depth"]["text"].startswith("34 = 1 stem conv + 2 convs x 16 blocks + 1 fc")


def ops_of(block):
    return [(o["kernel"][0], o["in_ch"], o["out_ch"], o["stride"], o["in_hw"][0], o["out_hw"][0])
            for o in block["ops"]]


def test_walkthrough_resnet50_224_and_512_seed_sizes():
    w = describe("resnet50")
    l1, l2, l3, l4 = w["stages"]
    assert ops_of(l1["blocks"][0]) == [(1, 64, 64, 1, 56, 56), (3, 64, 64, 1, 56, 56), (1, 64, 256, 1, 56, 56)]
    assert l1["blocks"][0]["shortcut"]["stride"] == 1 and l1["blocks"][0]["shortcut"]["out_ch"] == 256
    assert ops_of(l2["blocks"][0]) == [(1, 256, 128, 1, 56, 56), (3, 128, 128, 2, 56, 28), (1, 128, 512, 1, 28, 28)]
    assert ops_of(l2["blocks"][1]) == [(1, 512, 128, 1, 28, 28), (3, 128, 128, 1, 28, 28), (1, 128, 512, 1, 28, 28)]
    assert ops_of(l3["blocks"][0]) == [(1, 512, 256, 1, 28, 28), (3, 256, 256, 2, 28, 14), (1, 256, 1024, 1, 14, 14)]
    assert ops_of(l4["blocks"][0]) == [(1, 1024, 512, 1, 14, 14), (3, 512, 512, 2, 14, 7), (1, 512, 2048, 1, 7, 7)]
    assert w["depth"]["text"].startswith("50 = 1 stem conv + 3 convs x 16 blocks + 1 fc; the 4 projection convs are not counted")
    big = describe("resnet50", 512)
    assert [o["out_hw"][0] for o in big["stem"]] == [256, 128]
    assert ops_of(big["stages"][1]["blocks"][0]) == \
        [(1, 256, 128, 1, 128, 128), (3, 128, 128, 2, 128, 64), (1, 128, 512, 1, 64, 64)]
    assert [s["blocks"][-1]["out"][1] for s in big["stages"]] == [128, 64, 32, 16]
    assert big["head"]["avgpool"]["in_hw"] == [16, 16]
    v1 = describe("resnet50", stride_in_1x1=True)
    assert ops_of(v1["stages"][1]["blocks"][0])[0] == (1, 256, 128, 2, 56, 28)


def test_walkthrough_text_folds_blocks():
    text = render_describe(describe("resnet50"))
    assert "blocks 3-6: same as block 2" in text and "3x3 128->128" in text
    assert "s2 p1   128x128 -> 64x64" in render_describe(describe("resnet50", 512))
    assert "blocks 3-6" not in render_describe(describe("resnet50"), expand=True)


@pytest.mark.parametrize("name", rk.list_models())
def test_formula_agrees_with_forward_for_every_layer(name):
    size = 32 if rk.PRESETS[name].stem == "cifar" else 224
    for hw in ((size, size), (size + 13, size * 2 + 5)):
        recs = trace(build_model(name), hw)
        checked = [r for r in recs if r.formula_hw is not None]
        assert checked and all(tuple(r.out_shape[2:]) == r.formula_hw for r in checked)


def test_formula_agrees_on_real_cpu_forward():
    m = rk.create_model("resnet18", maxpool_padding=0)
    recs = trace(m, (97, 131))
    assert all(tuple(r.out_shape[2:]) == r.formula_hw for r in recs if r.formula_hw)


def test_too_small_input_names_the_layer():
    with pytest.raises(UserError, match="layer maxpool gets 1x1 and would output 0x0.*at least 5x5"):
        describe("resnet50", 1, maxpool_padding=0)
    with pytest.raises(UserError, match="layer maxpool"):
        summary("resnet50", 3, maxpool_padding=0)


def test_compare_reproduces_paper_table():
    rows = compare([(n, {}) for n in ("resnet18", "resnet34", "resnet50_v1", "resnet101_v1",
                                       "resnet152_v1")], memory=False)
    assert [r["depth"] for r in rows] == [18, 34, 50, 101, 152]
    assert [r["macs"] for r in rows] == [MACS[n][1] for n in ("resnet18", "resnet34", "resnet50",
                                                              "resnet101", "resnet152")]
    assert rows[0]["feature_maps"] == [112, 56, 28, 14, 7]


SCHEMAS = resources.files("resnetkit.analysis") / "schemas"


@pytest.mark.parametrize("argv,schema", [
    (["describe", "resnet50", "--json"], "describe.json"),
    (["summary", "resnet18", "--json", "--image-size", "64"], "summary.json"),
    (["flops", "resnet20", "--image-size", "32", "--json"], "flops.json"),
    (["compare", "resnet18", "resnet50:stride_in_1x1=true", "--no-memory", "--json"], "compare.json"),
])
def test_json_output_validates_against_schema(argv, schema, capsys):
    assert main(argv) == 0
    doc = json.loads(capsys.readouterr().out)
    jsonschema.validate(doc, json.loads((SCHEMAS / schema).read_text()))


def test_rich_table_fits_100_columns():
    out = subprocess.run([sys.executable, "-m", "resnetkit", "summary", "resnet152", "--depth", "0"],
                         capture_output=True, text=True, env={"COLUMNS": "100", "PATH": ""}, check=True).stdout
    rows = [line for line in out.splitlines() if line.startswith("│")]
    n_layers = len(summary("resnet152", depth=None, memory=False)["layers"])
    assert len(rows) == n_layers  # one line per row: nothing wrapped
    assert max(len(line) for line in out.splitlines()) <= 100


def test_cli_error_exit_2(capsys):
    assert main(["describe", "resnet5"]) == 2
    assert "did you mean" in capsys.readouterr().err
    assert main(["describe", "resnet50", "groups=x"]) == 2


def test_diagram_svg_and_png(tmp_path):
    svg = diagram(describe("resnet50"), tmp_path / "r50.svg").read_text()
    assert svg.startswith("<svg") and svg.count("stroke-dasharray") == 4  # 4 projections
    assert svg.count("<path") == 8  # 4 projection + 4 folded identity runs
    assert "conv3_x block 1" in svg and "512 @ 28x28" in svg
    png = diagram(describe("resnet20", 32), tmp_path / "r20.png")
    from PIL import Image
    im = Image.open(png)
    assert im.size[0] > 500 and im.size[1] > 1000
    with pytest.raises(UserError, match="svg or .png"):
        diagram(describe("resnet20", 32), tmp_path / "x.pdf")
