"""The command line itself: every option of every verb is documented, and command-line values
are parsed the same way everywhere."""
import argparse

import pytest

from resnetkit.cli import COMMANDS, build_parser, main
from resnetkit.errors import UserError


def _verbs() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_every_verb_is_registered_and_every_option_has_help():
    verbs = _verbs()
    assert set(verbs) == set(COMMANDS)
    missing = [f"{verb} {'/'.join(a.option_strings) or a.dest}"
               for verb, p in verbs.items() for a in p._actions
               if not isinstance(a, argparse._HelpAction) and not (a.help or "").strip()]
    assert missing == []


@pytest.mark.parametrize("verb", sorted(_verbs()))
def test_help_lists_each_option_with_its_text(verb, capsys):
    with pytest.raises(SystemExit) as e:
        main([verb, "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps the help text
    for a in _verbs()[verb]._actions:
        if a.option_strings:
            assert a.option_strings[0] in out
            assert " ".join(a.help.split()[:3]).replace("%%", "%") in out


def test_train_options_are_typed_by_the_config_fields():
    from resnetkit.train import build_config
    cfg = build_config(None, {"channels_last": "yes", "cache_images": "auto",
                              "model_overrides": "widths=8,16,32;stem_width=8",
                              "milestones": "0.3,0.6", "data_dir": "none"})
    assert cfg.channels_last is True and cfg.cache_images == "auto"
    assert cfg.model_overrides == {"widths": (8, 16, 32), "stem_width": 8}
    assert cfg.milestones == [0.3, 0.6] and cfg.data_dir is None
    with pytest.raises(UserError, match="channels_last expects a auto or bool"):
        build_config(None, {"channels_last": "sometimes"})
    with pytest.raises(UserError, match="config field groups expects a int"):
        build_config(None, {"model_overrides": "groups=two"})


def test_abbreviated_options_are_refused(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--epoch", "3"])
    assert e.value.code == 2 and "--epoch" in capsys.readouterr().err


def test_compare_specs_keep_commas_inside_values():
    from resnetkit.options import parse_model_spec
    assert parse_model_spec("resnet18:layers=1,1,1,1,stem=deep") == \
        ("resnet18", {"layers": (1, 1, 1, 1), "stem": "deep"})
    assert parse_model_spec("resnet50") == ("resnet50", {})
