"""The paper's experiments on tiny settings: degradation end to end (results, figure,
resume, refusals) and layer responses against an independent computation."""
import json
import sys

import pytest
import torch

from resnetkit.cli import main
from resnetkit.errors import UserError
from resnetkit.experiments import degradation, layer_responses, responses
import resnetkit.experiments.degradation  # noqa: E402  (the module, for monkeypatch)

# one process runs this file's tests, so its module fixtures are built once (see pyproject)
pytestmark = pytest.mark.xdist_group("test_experiments")
degradation_module = sys.modules["resnetkit.experiments.degradation"]

TINY = {"model_overrides": "widths=4,8,8;stem_width=4", "train_subset": "256",
        "test_subset": "100", "batch_size": "64", "epochs": "2", "precision": "fp32",
        "seed": "3"}


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    out = tmp_path_factory.mktemp("exp") / "deg"
    assert main(["experiment", "degradation", "--models", "plain20,resnet20", "--out", str(out),
                 *[a for k, v in TINY.items() for a in (f"--{k}", v)]]) == 0
    return out


def test_degradation_writes_the_errors_of_every_model_per_epoch(experiment):
    r = json.loads((experiment / "results.json").read_text())
    assert list(r) == ["plain20", "resnet20"]
    for rows in r.values():
        assert [row["epoch"] for row in rows] == [1, 2]
        assert all(0 <= row["train_error"] <= 100 and 0 <= row["test_error"] <= 100
                   for row in rows)
    # each number is the run's own metrics, as 100 x (1 - accuracy)
    first = json.loads((experiment / "runs" / "plain20" / "metrics.jsonl").read_text()
                       .splitlines()[0])
    assert r["plain20"][0]["train_error"] == pytest.approx(100 * (1 - first["train_acc"]), abs=1e-3)
    assert r["plain20"][0]["test_error"] == pytest.approx(100 * (1 - first["val_acc"]), abs=1e-3)
    assert (experiment / "degradation.png").read_bytes()[:4] == b"\x89PNG"
    # one recipe for both: the same seed, schedule and data
    cfgs = [json.loads((experiment / "runs" / m / "config.json").read_text())["train"]
            for m in ("plain20", "resnet20")]
    assert {k: v for k, v in cfgs[0].items() if k not in ("model", "name")} == \
        {k: v for k, v in cfgs[1].items() if k not in ("model", "name")}


def test_the_same_command_again_reads_finished_models_back(experiment, capsys):
    before = (experiment / "results.json").read_text()
    lines = []
    degradation(["plain20", "resnet20"], experiment, TINY, say=lines.append)
    assert sum("finished earlier" in ln for ln in lines) == 2
    assert (experiment / "results.json").read_text() == before


def test_other_folders_are_refused(experiment, tmp_path):
    with pytest.raises(UserError, match="holds another experiment"):
        degradation(["plain20"], experiment, TINY)
    (tmp_path / "mine.txt").write_text("x")
    with pytest.raises(UserError, match="holds no experiment"):
        degradation(["plain20"], tmp_path, TINY)
    with pytest.raises(UserError, match="unknown model 'plain21'"):
        degradation(["plain21"], tmp_path / "new", TINY)
    with pytest.raises(UserError, match="sets model, out_dir"):
        degradation(["plain20"], tmp_path / "new", {**TINY, "name": "x"})
    assert not (tmp_path / "new").exists()


def test_a_killed_experiment_continues_model_by_model(tmp_path, monkeypatch):
    real_fit, calls = degradation_module.Trainer.fit, []

    def fit_then_die(self, until_epoch=None):
        calls.append(self.cfg.model)
        if len(calls) == 2:  # the second model: one epoch, then the process "dies"
            real_fit(self, until_epoch=1)
            raise KeyboardInterrupt
        return real_fit(self, until_epoch)
    monkeypatch.setattr(degradation_module.Trainer, "fit", fit_then_die)
    out = tmp_path / "deg"
    with pytest.raises(KeyboardInterrupt):
        degradation(["plain20", "resnet20"], out, TINY)
    assert not (out / "results.json").exists()
    monkeypatch.setattr(degradation_module.Trainer, "fit", real_fit)
    lines = []
    r = degradation(["plain20", "resnet20"], out, TINY, say=lines.append)
    assert "plain20: finished earlier" in " ".join(lines)
    assert "resnet20: continuing from its last checkpoint" in lines
    assert [row["epoch"] for row in r["resnet20"]] == [1, 2]


def test_layer_responses_equal_an_independent_computation(experiment, tmp_path):
    run = experiment / "runs" / "resnet20"
    r = responses([run], tmp_path / "resp")
    layers = r["runs"][str(run)]["layers"]
    # ResNet-20: the 3x3 stem and two 3x3 convs in each of 9 blocks
    assert len(layers) == 1 + 2 * 9 and list(layers)[:3] == ["bn1", "layer1.0.bn1", "layer1.0.bn2"]
    assert (tmp_path / "resp" / "responses.png").exists()
    saved = json.loads((tmp_path / "resp" / "responses.json").read_text())
    assert saved["runs"][str(run)]["sorted"] == sorted(layers.values(), reverse=True)
    # the same std, by collecting one layer's whole output and calling torch.std
    from resnetkit.evaluate import open_eval, preprocess
    e = open_eval(run, "fashion-mnist", "test")
    outs = []
    h = e.model.layer2[1].bn2.register_forward_hook(lambda m, i, o: outs.append(o.detach()))
    with torch.no_grad():
        e.model.eval()(preprocess(e.data.images, e.mean, e.std, e.image_size))
    h.remove()
    expect = torch.cat(outs).double().flatten().std(unbiased=False).item()
    assert layers["layer2.1.bn2"] == pytest.approx(expect, rel=1e-6)


def test_responses_need_post_activation_3x3_layers():
    import resnetkit as rk
    m = rk.create_model("resnet18v2")
    with pytest.raises(UserError, match="no 3x3 conv followed by BatchNorm"):
        layer_responses(m, torch.zeros(1, 3, 32, 32, dtype=torch.uint8), [0.5] * 3, [0.2] * 3)
