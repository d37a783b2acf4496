"""The `resnetkit` command: parse arguments, call the library, render the result."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable

from .errors import UserError

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def command(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    COMMANDS[fn.__name__.removeprefix("cmd_")] = fn
    return fn


def _overrides(items: list[str] | None) -> dict[str, Any]:
    from .config import parse_override
    return dict(parse_override(t) for t in items or [])


def _emit_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2)
    sys.stdout.write("\n")


def _console():
    from rich.console import Console
    return Console(width=100) if not sys.stdout.isatty() else Console()


@command
def cmd_models(a: argparse.Namespace) -> int:
    from .zoo import PRESETS, list_models
    names = list_models(a.pattern)
    if a.json:
        _emit_json({n: {"depth": PRESETS[n].depth, "block": PRESETS[n].block,
                        "layers": list(PRESETS[n].layers)} for n in names})
        return 0
    from rich.table import Table
    t = Table("model", "block", "layers", "depth", "groups x width", "stem", "shortcut")
    for n in names:
        c = PRESETS[n]
        t.add_row(n, c.block, str(list(c.layers)), str(c.depth),
                  f"{c.groups}x{c.width_per_group}", c.stem, c.shortcut)
    _console().print(t)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="resnetkit", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("models", help="list the presets")
    s.add_argument("pattern", nargs="?", default="*", help="shell pattern, e.g. 'resnext*'")
    s.add_argument("--json", action="store_true")

    for extend in _EXTENSIONS:
        extend(sub)
    return p


# Later modules add their verbs here, so this file stays a table of thin shells.
_EXTENSIONS: list[Callable[[Any], None]] = []


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command.replace("-", "_")](args)
    except UserError as e:
        print(f"resnetkit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
