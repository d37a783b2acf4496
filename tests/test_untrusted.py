"""Input from outside at its roots: text shown on a terminal, names that become paths, JSON
from files, files that are not regular, outputs the user did not name, run folders, and the
bounds checked before memory is used. Every expected string below is written out by hand."""
import json
import os
import resource
import subprocess
import sys

import pytest
import torch

import resnetkit as rk
from resnetkit import render
from resnetkit.cli import main
from resnetkit.errors import UserError
from resnetkit.runtime import available_memory, check_memory, memory_estimate
from resnetkit.untrusted import json_depth, parse_json, path_component, regular_file, shown

HOSTILE = "cat\x1b[2J\x1b[31mred\nfake row | 0.99\r\u202eevil[bold]loud[/bold]:smile:"


def test_shown_escapes_every_control_and_format_character():
    assert shown(HOSTILE) == ("cat\\x1b[2J\\x1b[31mred\\x0afake row | 0.99\\x0d\\u202eevil"
                              "[bold]loud[/bold]:smile:")
    assert shown("Äpfel 中文 tab\tend") == "Äpfel 中文 tab\\x09end"
    assert shown("plain") == "plain"
    assert shown(shown(HOSTILE)) == shown(HOSTILE)  # escaping twice changes nothing more


@pytest.mark.parametrize("name", ["..", ".", "", " ", "../x", "/tmp/abs", "a/b", "a\\b",
                                  "a\x00b", "a\nb", "x" * 256, " lead"])
def test_a_name_that_is_not_one_path_component_is_refused(name):
    with pytest.raises(UserError, match="run name"):
        path_component(name, "run name")


def test_plain_names_are_path_components():
    for name in ("run-1", "resnet20_fashion.v2", "Äpfel", "x" * 255):
        assert path_component(name, "run name") == name


def test_json_is_bounded_before_it_is_parsed():
    assert json_depth(b'{"a": "[[[[[[[[", "b": [[1], {"c": 2}]}') == 3
    assert json_depth(b'"\\"[[["') == 0  # brackets inside a string with an escaped quote
    assert parse_json('{"a": [1, 2]}', "f") == {"a": [1, 2]}
    with pytest.raises(UserError, match="nests deeper than 32 levels"):
        parse_json("[" * 100_000 + "]" * 100_000, "f.safetensors")
    with pytest.raises(UserError, match="over the limit of 1,000"):
        parse_json("[" + "1," * 1000 + "1]", "f", max_bytes=1000)
    with pytest.raises(UserError, match="not valid JSON"):
        parse_json("{oops", "f")
    with pytest.raises(UserError, match="not valid JSON"):
        parse_json(b"\xff\xfe", "f")


def test_only_regular_files_are_read(tmp_path):
    fifo = tmp_path / "x.png"
    os.mkfifo(fifo)
    with pytest.raises(UserError, match="is a FIFO, not a regular image"):
        regular_file(fifo, "image")  # returns at once: nothing opens the FIFO
    with pytest.raises(UserError, match="is a folder"):
        regular_file(tmp_path, "image")
    with pytest.raises(UserError, match="no image at"):
        regular_file(tmp_path / "missing.png", "image")


def _printed(capsys, draw, *args):
    draw(*args)
    return capsys.readouterr().out


def test_tables_show_hostile_text_escaped_and_never_as_markup(capsys):
    top = [{"class": HOSTILE, "prob": 0.9}, {"class": "[red]b[/red]", "prob": 0.1}]
    out = _printed(capsys, render.predictions, [{"file": "a\x1b]0;title\x07.png", "top": top}])
    assert "\x1b" not in out and "\x07" not in out and "\r" not in out
    assert "fake row" in out and "\\x0afake row" in out.replace("\n", "").replace("│", "")
    assert "[red]b[/red]" in out  # markup shown as the text it is
    assert "[bold]loud" in out.replace("\n", "").replace("│", "").replace(" ", "")
    ev = {"top1": 0.5, "top5": 1.0, "loss": 0.1, "per_class": {HOSTILE: 0.5, "b": 0.5},
          "confusion": [[1, 1], [1, 1]]}
    out = _printed(capsys, render.evaluation, ev, "run [b]x[/b]")
    assert "\x1b" not in out and "run [b]x[/b]" in out
    # the lines are the table's and the matrix's own: no row added by a class name
    assert not any(line.startswith("fake row") for line in out.splitlines())


def test_cli_errors_quote_hostile_text_on_one_line(capsys):
    assert main(["describe", "res\x1b[2Jnet\nFAKE"]) == 2
    err = capsys.readouterr().err
    assert "\x1b" not in err and err.count("\n") == 1 and "FAKE" in err
    with pytest.raises(SystemExit):  # argparse's own message quotes the name too
        main(["weights", "bogus\x1b[2J"])
    err = capsys.readouterr().err
    assert "\x1b" not in err


def test_overrides_may_follow_the_options(tmp_path, capsys):
    out = tmp_path / "m.onnx"
    assert main(["export", "resnet20", "-o", str(out), "in_chans=1", "--image-size", "28"]) == 0
    assert "1 channels" in capsys.readouterr().out and out.exists()
    with pytest.raises(SystemExit) as e:  # an unknown option is still argparse's error
        main(["describe", "resnet20", "--image-size", "32", "--bogus"])
    assert e.value.code == 2


def test_a_default_output_name_never_replaces_a_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "resnet20.svg").write_text("mine")
    assert main(["diagram", "resnet20"]) == 2
    assert "already exists; name the output with -o" in capsys.readouterr().err
    assert (tmp_path / "resnet20.svg").read_text() == "mine"
    m = rk.create_model("resnet20", widths=(4, 8, 8), stem_width=4, num_classes=10)
    torch.save(m.state_dict(), tmp_path / "w.pth")
    (tmp_path / "w.safetensors").write_bytes(b"precious")
    assert main(["weights", "convert", "w.pth"]) == 2
    assert (tmp_path / "w.safetensors").read_bytes() == b"precious"
    (tmp_path / "resnet20.onnx").write_bytes(b"precious")
    assert main(["export", "resnet20"]) == 2
    assert (tmp_path / "resnet20.onnx").read_bytes() == b"precious"
    # named with -o, the output is replaced (atomically, as before)
    assert main(["diagram", "resnet20", "-o", "resnet20.svg"]) == 0
    assert (tmp_path / "resnet20.svg").read_text().startswith("<")


TINY = dict(model="resnet20", model_overrides={"widths": (4, 8, 8), "stem_width": 4},
            train_subset=256, test_subset=100, batch_size=64, epochs=1, precision="fp32",
            plots=False)


def test_run_names_stay_inside_out_dir(tmp_path):
    from resnetkit.train import build_config
    for name in ("../up", "/tmp/abs", "a/b", ".."):
        with pytest.raises(UserError, match="not a plain folder or file name"):
            build_config(None, **TINY, out_dir=str(tmp_path / "runs"), name=name)
    recipe = tmp_path / "shared.toml"
    recipe.write_text('model = "resnet20"\nname = "../escape"\n')
    with pytest.raises(UserError, match="'../escape' is not a plain"):
        build_config(str(recipe))
    recipe.write_text('model = "resnet20"\nthreads = "many"\n')
    with pytest.raises(UserError, match="threads='many' is invalid: must be of type int"):
        build_config(str(recipe))
    with pytest.raises(UserError, match="threads=-1 is invalid"):
        build_config(None, threads=-1)
    assert not (tmp_path / "up").exists() and not list(tmp_path.glob("*escape*"))


def test_a_folder_that_is_not_a_run_is_never_adopted(tmp_path):
    from resnetkit.train import Trainer, build_config
    mine = tmp_path / "runs" / "exp"
    mine.mkdir(parents=True)
    files = {"best.safetensors": b"my weights", "curves.png": b"my plot", "notes.txt": b"x"}
    for k, v in files.items():
        (mine / k).write_bytes(v)
    t = Trainer(build_config(None, **TINY, out_dir=str(tmp_path / "runs"), name="exp"),
                quiet=True)
    with pytest.raises(UserError, match="already exists and is not a run of resnetkit"):
        t.fit()
    assert {p.name: p.read_bytes() for p in mine.iterdir()} == files


def test_a_run_config_that_nests_too_deep_is_one_sentence(tmp_path):
    from resnetkit.train import Trainer
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text('{"train": ' + "[" * 50_000 + "]" * 50_000 + "}")
    with pytest.raises(UserError, match="nests deeper than 32 levels"):
        Trainer.resume(run)
    (run / "config.json").write_text(json.dumps({"train": {**TINY, "threads": -1}}))
    with pytest.raises(UserError, match="threads=-1 is invalid"):
        Trainer.resume(run)


def test_the_python_api_refuses_nonsense_in_one_sentence():
    with pytest.raises(UserError, match="named by a string"):
        rk.create_model(None)
    with pytest.raises(UserError, match="out_indices is empty"):
        rk.create_model("resnet18", features_only=True, out_indices=())
    with pytest.raises(UserError, match="num_classes must be a whole number from 0"):
        rk.create_model("resnet20").reset_classifier(-1)


def test_foreign_files_with_odd_keys_are_one_sentence(tmp_path):
    from resnetkit.weights.sources import load_source
    t = torch.zeros(2)
    for i, state in enumerate([{1: t}, {(2, 3): t}, {"stages.x.blocks.0.conv1.weight": t},
                               {"stages.0.blocks.0.downsample": t, "stem.conv.weight": t}]):
        p = tmp_path / f"odd{i}.pth"
        torch.save(state, p)
        with pytest.raises(UserError):
            load_source(p)


def test_the_memory_estimate_matches_a_count_by_hand():
    # ResNet-18's 11,689,512 parameters (REFERENCE.md section 1) and 9,600 BN running
    # buffers + 20 num_batches_tracked (int64) are the whole of its fp32 weights
    est = memory_estimate(rk.get_config("resnet18"))
    assert est["weights"] == (11_689_512 + 9_600) * 4 + 20 * 8
    assert est["activations"] == 0
    # inference at 224: the two largest layer outputs are conv1's and bn1's, 64x112x112 each
    est = memory_estimate(rk.get_config("resnet18"), 224, batch=2)
    assert est["activations"] == 2 * 2 * 64 * 112 * 112 * 4


def test_a_network_too_large_for_memory_is_refused_before_it_is_built():
    wide = rk.get_config("resnet50", widths=(16384,) * 4, expansion=1)
    with pytest.raises(UserError, match=r"needs about \d+\.\d GiB .* available"):
        check_memory(wide, what="resnet50")
    with pytest.raises(UserError, match="needs about"):
        rk.create_model("resnet50", widths=(16384,) * 4, expansion=1)
    assert available_memory() > 0


LIMITED = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
from resnetkit.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_under_an_address_space_limit_training_is_refused_in_one_sentence(tmp_path):
    # 3 GiB of address space (ulimit -v): a batch of 4096 224x224 images cannot fit
    r = subprocess.run([sys.executable, "-c", LIMITED, "train", "--model", "resnet50",
                        "--image_size", "224", "--train_subset", "64", "--batch_size", "4096",
                        "--out_dir", str(tmp_path), "--precision", "fp32"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "needs about" in r.stderr
    assert not any(tmp_path.iterdir())


def test_oversized_sizes_in_analysis_verbs_are_one_sentence(capsys):
    for argv in (["describe", "resnet50", "--image-size", "10000000"],
                 ["flops", "--block", "basic:99999999"],
                 ["flops", "--block", "basic:64", "--image-size", "99999999"],
                 ["summary", "resnet50", "widths=99999999,1,1,1"],
                 ["describe", "resnet50", "layers=999999,1,1,1"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err


def test_warnings_on_the_command_line_are_escaped(tmp_path, capsys):
    import warnings

    from resnetkit.cli import _show_warning
    line = _show_warning(UserWarning("skipping bad\x1b[2J\nfile.png"), UserWarning, "f.py", 1)
    assert line == "warning: skipping bad\\x1b[2J\\x0afile.png\n"
    main(["models", "resnet18"])  # main installs it for every verb
    assert warnings.formatwarning is _show_warning
