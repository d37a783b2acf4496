"""The hostile-input and fault campaign: each case runs `resnetkit` in a fresh process on a
bad input or under a fault and is judged by its outcome. Prints a JSON table (case, exit
code, verdict, last line, and a note where a case measures something) and the counts of
each verdict.

Verdicts: "ok" (one clear sentence and the expected exit code, or the expected success),
"traceback" (a Python traceback reached the user), "hang" (still running after the time
limit, or a server that kept a hostile connection open or stopped answering /health),
"killed" (the process died by a signal, e.g. aborted under the address-space limit),
"silent" (exit 0 where an error was due, or a wrong result), "wrong-exit" (an error, but
not the expected exit code or not saying what it should), "lost" (a file that existed
before was damaged or a partial file was left behind), "escape-path" (a file was written
outside the folder it belongs in), "escape" (untrusted text reached the terminal raw: a
control character or a line break from a hostile string appears unescaped in the output,
or rich markup from it was interpreted).

The cases come in classes: the original ones; untrusted text on the terminal; paths that
climb out of their folder; data loss; hangs and memory (FIFOs, the server's headers, slow
clients and event loop, very large networks under an address-space limit); silently wrong
results; tracebacks from hostile metadata, foreign files, sizes and the Python API; and
bugs found in the evaluation paths. Cases that may allocate a lot run under RLIMIT_AS
(12 GiB); servers bind 127.0.0.1 on a free port and are killed with their process group.

    python benchmarks/fault_campaign.py [--out DIR] [--timeout 180] [--only SUBSTRING]
"""
from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import pickle
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

TINY = ["--model", "resnet20", "--model_overrides", "widths=4,8,8;stem_width=4",
        "--train_subset", "256", "--test_subset", "100", "--batch_size", "64",
        "--precision", "fp32", "--plots", "false"]
# a tiny run on an image folder (few images: small batches, no decoding processes)
FOLDER_TINY = ["--model", "resnet20", "--model_overrides", "widths=4,8,8;stem_width=4",
               "--image_size", "28", "--batch_size", "4", "--epochs", "1", "--precision",
               "fp32", "--plots", "false", "--workers", "0"]
MEM_LIMIT = 12 << 30  # address space of the cases that may allocate without bound
HANG_S = 25           # time limit of the cases that may hang
NESTED = "[" * 100_000  # JSON nested deeper than any parser's recursion limit

# Untrusted strings: terminal control sequences, a line break that forges a table row, rich
# markup, a carriage return, a bell and a C1 control (CSI). Each carries a marker zzN so the
# output can be searched for what became of it. Folder and file names cannot hold "/".
HOSTILE = ["zz1\x1b[2Jzz1", "zz2\x1b[31mzz2", "zz3\nFAKE ROW | 0.99", "[bold]zz4[/bold]",
           "[link=http://x]zz5[/link]", "zz6\rOVERWRITTEN", "zz7\x07bell", "zz8\x9b2Jzz8",
           "plain9", "plain10"]
HOSTILE_NAMES = ["zz1\x1b[2Jzz1", "zz2\x1b[31mzz2", "zz3\nFAKE ROW | 0.99", "[bold]zz4",
                 "[link=x]zz5", "zz6\rOVERWRITTEN", "zz7\x07bell", "zz8\x9b2Jzz8", "plain9",
                 "plain10"]

# The Python API cases: ValueError (UserError included) is a clean refusal (exit 2), any
# other exception a traceback (exit 1).
PY_WRAP = """
import sys, traceback
try:
    exec(compile(sys.argv[1], "<case>", "exec"))
except ValueError as e:
    print(f"{type(e).__name__}: {e}", file=sys.stderr)
    sys.exit(2)
except BaseException:
    traceback.print_exc()
    sys.exit(1)
"""
PY_TINY = ("import torch, resnetkit as rk\n"
           "m = rk.create_model('resnet20', widths=(4, 8, 8), stem_width=4, in_chans=1, "
           "num_classes=10).eval()\n")


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()} if d.exists() else {}


def _snapshot(paths: list[Path]) -> dict[str, bytes]:
    """The bytes of every regular file at or under `paths` (FIFOs and devices are never
    opened)."""
    out = {}
    for p in paths:
        if p.is_file():
            out[str(p)] = p.read_bytes()
        elif p.is_dir():
            out.update({str(f): f.read_bytes() for f in p.rglob("*") if f.is_file()})
    return out


def _tree(root: Path) -> set[str]:
    return {str(p) for p in root.rglob("*")} if root.exists() else set()


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEM_LIMIT, MEM_LIMIT))


def _kill_group(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        p.wait(10)
    except subprocess.TimeoutExpired:
        pass


def run(args: list[str], timeout: float, env: dict | None = None, signal_after: float = 0,
        sig: int = signal.SIGTERM, cwd: Path | None = None, memlimit: bool = False,
        cmd: list[str] | None = None) -> tuple[int | None, str, str]:
    """(exit code or None after the time limit, stdout, stderr) of `resnetkit ARGS` (or of
    `cmd`) in a process group of its own, killed whole at the time limit."""
    # bytes, decoded without newline translation: a carriage return must stay one
    p = subprocess.Popen(cmd or [sys.executable, "-m", "resnetkit", *args],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env={**os.environ, **(env or {})}, cwd=cwd, start_new_session=True,
                         preexec_fn=_limit_memory if memlimit else None)
    text = lambda b: b.decode("utf-8", errors="replace")  # noqa: E731
    try:
        if signal_after:
            time.sleep(signal_after)
            p.send_signal(sig)
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(p)
        out, err = p.communicate()
        return None, text(out), text(err)
    return p.returncode, text(out), text(err)


# ---- what became of the untrusted text ----------------------------------------------------

def _controls(s: str) -> set[str]:
    return {ch for ch in s if unicodedata.category(ch) == "Cc" and ch not in "\n\t"}


def escaped(output: str, hostile: list[str]) -> str | None:
    """What reached the terminal raw, or None: a control character of a hostile string, its
    line break (the text after it starts a line of the output), or its rich markup (the
    marker shows, the tag before it does not)."""
    for h in hostile:
        raw = _controls(h) & set(output)
        if raw:
            return f"raw {', '.join(repr(c) for c in sorted(raw))} from {h!r}"
        if "\n" in h:
            after = re.escape(h.split("\n", 1)[1].split()[0])
            if re.search(rf"(?m)^[\s│┃|]*{after}", output):
                return f"the line break of {h!r} reached the output"
        m = re.search(r"\[[^\]\[]*\](zz\d+)", h)
        if m and m.group(1) in output and m.group(0) not in output:
            return f"the markup of {h!r} was interpreted"
    return None


# ---- hostile and damaged files ------------------------------------------------------------

def _png(path: Path, size: tuple[int, int] = (28, 28), value: int = 128, mode: str = "L") -> Path:
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path, "PNG")
    return path


def _folder(root: Path, split: str, classes: list[str], n: int) -> None:
    for i, c in enumerate(classes):
        for j in range(n):
            _png(root / split / c / f"{j}.png", value=(17 * i + 5 * j) % 256)


def make_files(d: Path) -> dict[str, Path]:
    """Hostile and damaged inputs of every kind the project reads."""
    import resnetkit as rk
    from safetensors.torch import save_file
    from resnetkit.weights.checkpoint import config_to_dict
    f = {}
    m = rk.create_model("resnet20", widths=(4, 8, 8), stem_width=4, in_chans=1, num_classes=10)
    sd = {k: v.contiguous() for k, v in m.state_dict().items()}
    cfg = config_to_dict(m.cfg)
    pre = {"mean": [0.3], "std": [0.3], "image_size": 28, "in_chans": 1}
    from resnetkit.data.lookup import FASHION_CLASSES
    classes = list(FASHION_CLASSES)  # so that `eval` on Fashion-MNIST takes these files

    def ckpt(name, config, **meta):
        meta = {"resnet_config": config if isinstance(config, str) else json.dumps(config),
                **{k: json.dumps(v) for k, v in meta.items()}}
        save_file(sd if name != "inf" else {**sd, "bn1.running_var": torch.full((4,), float("inf"))},
                  str(d / f"{name}.safetensors"), metadata=meta)
        f[name] = d / f"{name}.safetensors"
    ckpt("good", cfg, classes=classes, preprocess=pre)
    ckpt("huge_layers", {**cfg, "layers": [100000] * 3}, classes=classes, preprocess=pre)
    ckpt("huge_image", cfg, classes=classes, preprocess={**pre, "image_size": 100000})
    ckpt("bad_json", "{oops", classes=classes)
    ckpt("unknown_key", {**cfg, "colour": "red"})
    ckpt("wrong_classes", cfg, classes=["a"], preprocess=pre)
    ckpt("std_zero", cfg, classes=classes, preprocess={**pre, "std": [0.0]})
    ckpt("wrong_type", {**cfg, "block": None})
    ckpt("inf", cfg, classes=classes, preprocess=pre)
    (d / "random.safetensors").write_bytes(os.urandom(4096))
    f["random"] = d / "random.safetensors"
    (d / "empty.pth").write_bytes(b"")
    f["empty_pth"] = d / "empty.pth"
    for suffix in (".pth", ".pdparams", ".state.pt"):
        p = d / f"evil{suffix}"
        p.write_bytes(pickle.dumps({"conv1.weight": _Evil(d / "PWNED")}))
        f[f"evil{suffix}"] = p
    from PIL import Image
    Image.new("L", (28, 28), 128).save(d / "img.png")
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (d / "bomb.png").write_bytes(b"")
    Image.new("L", (20000, 20000)).save(d / "bomb.png")
    f.update(img=d / "img.png", broken=d / "broken.png", bomb=d / "bomb.png")

    # untrusted text: class names (the model's own, and an image folder's), file names
    ckpt("hostile", cfg, classes=HOSTILE, preprocess=pre)
    ckpt("hostile_dir", cfg, classes=sorted(HOSTILE_NAMES), preprocess=pre)
    _folder(d / "hostile_folder", "train", HOSTILE_NAMES, 6)
    _folder(d / "hostile_folder", "test", HOSTILE_NAMES, 3)
    for n in HOSTILE_NAMES[:8]:
        _png(d / "hostile_imgs" / f"{n}.png")
    (d / "hostile_empty" / "test" / "ok").mkdir(parents=True, exist_ok=True)
    _png(d / "hostile_empty" / "test" / "ok" / "0.png")
    (d / "hostile_empty" / "test" / "zz1\x1b[2Jzz1").mkdir(exist_ok=True)
    hostile_run = d / "zzP\x1b[2J[red]zzR"
    hostile_run.mkdir(exist_ok=True)
    shutil.copy(f["good"], hostile_run / "best.safetensors")
    f.update(hostile_folder=d / "hostile_folder", hostile_imgs=d / "hostile_imgs",
             hostile_empty=d / "hostile_empty", hostile_run=hostile_run)

    # silently wrong: huge finite weights; image folders whose classes differ by split
    huge = {k: (v * 0 + 3e38 if k == "fc.weight" else v) for k, v in sd.items()}
    save_file(huge, str(d / "huge_fc.safetensors"), metadata={
        "resnet_config": json.dumps(cfg), "classes": json.dumps(classes),
        "preprocess": json.dumps(pre)})
    huge_all = {k: (torch.full_like(v, 3e38) if v.is_floating_point() else v)
                for k, v in sd.items()}
    save_file(huge_all, str(d / "huge_all.safetensors"), metadata={
        "resnet_config": json.dumps(cfg), "classes": json.dumps(classes),
        "preprocess": json.dumps(pre)})
    f.update(huge_fc=d / "huge_fc.safetensors", huge_all=d / "huge_all.safetensors")
    two = rk.create_model("resnet20", widths=(4, 8, 8), stem_width=4, in_chans=1, num_classes=2)
    save_file({k: v.contiguous() for k, v in two.state_dict().items()},
              str(d / "two_class.safetensors"), metadata={
                  "resnet_config": json.dumps(config_to_dict(two.cfg)),
                  "classes": json.dumps(["apple", "banana"]), "preprocess": json.dumps(pre)})
    f["two_class"] = d / "two_class.safetensors"
    _folder(d / "classes_differ", "train", ["apple", "banana"], 12)
    _folder(d / "classes_differ", "test", ["banana", "cherry"], 6)
    _folder(d / "classes_extra", "train", ["apple", "banana"], 12)
    _folder(d / "classes_extra", "test", ["apple", "banana", "cherry"], 6)

    # tracebacks: metadata nested too deep, odd preprocessing and configs
    def raw_ckpt(name, **meta):
        save_file(sd, str(d / f"{name}.safetensors"), metadata=meta)
        f[name] = d / f"{name}.safetensors"
    good_meta = {"resnet_config": json.dumps(cfg), "classes": json.dumps(classes),
                 "preprocess": json.dumps(pre)}
    raw_ckpt("nested_config", **{**good_meta, "resnet_config": NESTED})
    raw_ckpt("nested_classes", **{**good_meta, "classes": NESTED})
    raw_ckpt("nested_preprocess", **{**good_meta, "preprocess": NESTED})
    ckpt("size0", cfg, classes=classes, preprocess={**pre, "image_size": 0})
    ckpt("no_preprocess", cfg, classes=classes)
    ckpt("no_mean", cfg, classes=classes, preprocess={k: v for k, v in pre.items() if k != "mean"})
    ckpt("no_widths", {k: v for k, v in cfg.items() if k != "widths"}, classes=classes,
         preprocess=pre)
    ckpt("no_layers", {k: v for k, v in cfg.items() if k != "layers"}, classes=classes,
         preprocess=pre)
    _png(d / "img40.png", (40, 40))
    f["img40"] = d / "img40.png"

    # foreign weight files: a preset's torchvision names (resnet20 is the smallest preset,
    # and a foreign file must match one), PaddlePaddle's, odd keys
    tv = rk.create_model("resnet20").state_dict()
    (d / "foreign").mkdir(exist_ok=True)
    torch.save(tv, d / "foreign" / "tv.pth")
    paddle = {}
    for k, v in tv.items():
        if k.endswith("num_batches_tracked"):
            continue
        head, _, leaf = k.rpartition(".")
        leaf = {"running_mean": "_mean", "running_var": "_variance"}.get(leaf, leaf)
        paddle[f"{head}.{leaf}"] = (v.t() if k == "fc.weight" else v).numpy().copy()
    (d / "foreign" / "pd.pdparams").write_bytes(pickle.dumps(paddle, protocol=4))
    torch.save({"stem": torch.zeros(4, 3, 3, 3), "head.fc": torch.zeros(10, 8),
                "stages.0": torch.zeros(8), "stages.0.blocks": torch.zeros(8)},
               d / "v2_partial.pth")
    torch.save({1: torch.zeros(3), (2, 3): torch.zeros(3), "conv1.weight": torch.zeros(4, 3, 3, 3)},
               d / "odd_keys.pth")
    f.update(tv=d / "foreign" / "tv.pth", paddle=d / "foreign" / "pd.pdparams",
             v2_partial=d / "v2_partial.pth", odd_keys=d / "odd_keys.pth")
    return f


# ---- cases --------------------------------------------------------------------------------

@dataclass
class Case:
    """One run of `resnetkit ARGS` (or of a Python snippet) and how to judge it.

    expected: the exit code(s) that are right; check(stdout + stderr) -> True, False (not
    what was due) or a verdict, or (that, a note for the row); keep: files and folders
    whose bytes must not change; sandbox (root, allowed): nothing new may appear under root
    outside allowed; hostile: untrusted strings that must not reach the terminal raw;
    needs: fixtures built first; setup: run before; python: a snippet run by PY_WRAP
    instead of resnetkit; special: a function that judges the case itself -> (verdict,
    exit, last line, note)."""

    name: str
    args: list[str] = field(default_factory=list)
    expected: int | tuple[int, ...] = 2
    check: Callable[[str], bool | str] | None = None
    timeout: float | None = None
    cwd: Path | None = None
    keep: list[Path] = field(default_factory=list)
    sandbox: tuple[Path, Path] | None = None
    hostile: list[str] = field(default_factory=list)
    needs: tuple[str, ...] = ()
    setup: Callable[[], None] | None = None
    memlimit: bool = False
    python: str | None = None
    special: Callable[["Fixtures"], tuple[str, Any, str, str]] | None = None


class FixtureError(Exception):
    def __init__(self, verdict: str, line: str):
        super().__init__(line)
        self.verdict, self.line = verdict, line


class Fixtures:
    """What some cases need first (a trained run, an exported file, a server), built once,
    when first needed. A fixture that fails gives its failure to the cases that need it."""

    def __init__(self, d: Path, f: dict[str, Path], timeout: float):
        self.d, self.f, self.timeout = d, f, timeout
        self.fx = d / "fx"
        self.fx.mkdir(exist_ok=True)
        self.done: dict[str, Any] = {}
        self.server: Server | None = None

    def need(self, name: str) -> Any:
        if name == "server":  # not kept: restarted where a case killed it
            return self._server()
        if name not in self.done:
            try:
                self.done[name] = getattr(self, f"_{name}")()
            except FixtureError as e:
                self.done[name] = e
            except Exception as e:  # noqa: BLE001 - the fixture's own failure, reported
                self.done[name] = FixtureError("wrong-exit", f"{type(e).__name__}: {e}")
        if isinstance(self.done[name], FixtureError):
            raise self.done[name]
        return self.done[name]

    def _cli(self, what: str, args: list[str], timeout: float | None = None) -> str:
        code, out, err = run(args, timeout or self.timeout)
        v = verdict(code, out + err, 0, None, None, None)
        if v != "ok":
            raise FixtureError(v, f"{what}: {_last(out + err)}")
        return out

    def _exp(self) -> Path:  # the original cases' run (made by "train first run")
        run_dir = self.d / "runs" / "exp"
        if not (run_dir / "config.json").exists():
            self._cli("train exp", ["train", *TINY, "--epochs", "1", "--out_dir",
                                    str(self.d / "runs"), "--name", "exp"])
        return run_dir

    def _run(self) -> Path:
        if (self.fx / "run" / "best.safetensors").exists():
            return self.fx / "run"
        self._cli("train", ["train", *TINY, "--epochs", "1", "--out_dir", str(self.fx),
                            "--name", "run"])
        return self.fx / "run"

    def _sub(self) -> float:
        """A run on Fashion-MNIST classes 5, 6, 7 and its own top-1 (torch, fp32)."""
        if not (self.fx / "sub" / "best.safetensors").exists():
            self._cli("train --classes 5,6,7", [
                "train", "--model", "resnet20", "--model_overrides", "widths=4,8,8;stem_width=4",
                "--classes", "5,6,7", "--train_subset", "1500", "--test_subset", "300",
                "--batch_size", "64", "--epochs", "2", "--precision", "fp32", "--plots", "false",
                "--out_dir", str(self.fx), "--name", "sub"])
        out = self._cli("eval --json", ["eval", str(self.fx / "sub"), "--json"])
        return json.loads(out)["top1"]

    def _sub_int8(self) -> Path:
        path = self.fx / "sub.int8.onnx"
        if path.exists():
            return path
        self._cli("quantize", ["quantize", str(self.fx / "sub"), "--calibration",
                               "fashion-mnist:64", "-o", str(path)])
        return path

    def _hostile_run(self) -> Path:
        """A run trained on the image folder with hostile class names; where training
        refuses the folder (a fair answer, judged by its own case), its checkpoint is made
        directly."""
        run_dir = self.fx / "hrun"
        if (run_dir / "best.safetensors").exists():
            return run_dir
        code, _, _ = run(["train", *FOLDER_TINY, "--dataset", f"folder:{self.f['hostile_folder']}",
                          "--out_dir", str(self.fx), "--name", "hrun"], self.timeout)
        if code != 0 or not (run_dir / "best.safetensors").exists():
            shutil.rmtree(run_dir, ignore_errors=True)
            run_dir.mkdir()
            shutil.copy(self.f["hostile_dir"], run_dir / "best.safetensors")
        return run_dir

    def _onnx(self) -> dict[str, Path]:
        """The good checkpoint exported to ONNX, and copies whose metadata is hostile."""
        import onnx
        from resnetkit.infer.export import export_source
        good = self.d / "good.onnx"
        if not good.exists():
            export_source(str(self.f["good"]), None, "onnx", str(good))
        out = {"good": good}
        for name, key, value in (("nested_classes", "classes", NESTED),
                                 ("nested_preprocess", "preprocess", NESTED),
                                 ("hostile", "classes", json.dumps(HOSTILE))):
            proto = onnx.load(str(good))
            for p in proto.metadata_props:
                if p.key == key:
                    p.value = value
            out[name] = self.d / f"{name}.onnx"
            onnx.save(proto, str(out[name]))
        return out

    def _server(self) -> "Server":
        if self.server is None or not self.server.alive():
            if self.server is not None:
                self.server.close()
            self.server = Server(self.f["good"])
        return self.server

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None


# ---- the server and raw clients ----------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def group_rss_mb(pgid: int) -> float:
    """Resident memory of every process in a process group, MB."""
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[2]) != pgid:
                continue
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1])
        except (OSError, ValueError, IndexError):
            continue
    return total * os.sysconf("SC_PAGE_SIZE") / 1e6


class Server:
    """`resnetkit serve` on a free port of 127.0.0.1, in its own process group (killed whole
    at the end), under the address-space limit; ready when /health answers 200."""

    def __init__(self, model: Path, *args: str, ready_s: float = 240, fixture: bool = True):
        """Started and ready, or (fixture) FixtureError; with fixture=False `self.state` says
        "ready", "exited" (self.proc.returncode, self.output()) or "not ready"."""
        self.port = free_port()
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "resnetkit", "serve", str(model), "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1", *args],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=_limit_memory)
        deadline = time.monotonic() + ready_s
        self.state = "not ready"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.state = "exited"
                break
            if self.health(2)[0] == 200:
                self.state = "ready"
                return
            time.sleep(0.5)
        if self.state == "not ready":
            _kill_group(self.proc)
        if fixture:
            out = self.output()
            self.close()
            if self.state == "exited":
                raise FixtureError(verdict(self.proc.returncode, out, 0, None, None, None),
                                   f"serve exited: {_last(out)}")
            raise FixtureError("hang", f"serve not ready within {ready_s:.0f} s")

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def health(self, timeout: float = 5) -> tuple[int | None, float]:
        t = time.perf_counter()
        try:
            c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
            c.request("GET", "/health")
            status = c.getresponse().status
            c.close()
        except (OSError, http.client.HTTPException):
            status = None
        return status, time.perf_counter() - t

    def alive(self) -> bool:
        return self.proc.poll() is None and self.health(10)[0] == 200

    def rss(self) -> float:
        return group_rss_mb(self.proc.pid)

    def close(self) -> None:
        _kill_group(self.proc)
        self.log.close()


class PeakRSS:
    """The server's peak resident memory while the block runs (sampled every 50 ms)."""

    def __init__(self, server: Server):
        self.server, self.stop = server, threading.Event()

    def __enter__(self):
        self.base = self.peak = self.server.rss()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.stop.wait(0.05):
            self.peak = max(self.peak, self.server.rss())

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()

    @property
    def growth(self) -> float:
        return self.peak - self.base


def _status(data: bytes) -> int | None:
    m = re.match(rb"HTTP/1\.[01] (\d{3})", data)
    return int(m.group(1)) if m else None


def _answer(s: socket.socket, wait: float) -> tuple[str, int | None]:
    """("closed" | "answered" | "open", status) after the request: what the server did with
    the connection within `wait` seconds."""
    s.settimeout(wait)
    try:
        data = s.recv(4096)
    except socket.timeout:
        return "open", None
    except OSError:
        return "closed", None
    return ("answered", _status(data)) if data else ("closed", None)


def header_flood(server: Server, head: bytes, chunks,
                 wait: float = 20) -> tuple[str, int | None, int]:
    """Send a request line, then header bytes chunk by chunk, then the end of the headers;
    (what the server did, status, bytes it took before refusing or stalling)."""
    s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sent = 0
    try:
        s.sendall(head)
        for chunk in chunks:
            s.sendall(chunk)
            sent += len(chunk)
        s.sendall(b"\r\n")
    except socket.timeout:  # the server stopped reading: does it answer or close?
        pass
    except OSError:
        return "closed", None, sent
    try:
        return (*_answer(s, wait), sent)
    finally:
        s.close()


def _flood_case(lines: Callable[[], Any], total_mb: float, bound_mb: float):
    def judge(fx: Fixtures):
        server = fx.need("server")
        with PeakRSS(server) as mem:
            what, status, sent = header_flood(
                server, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n", lines())
        note = (f"{what} (status {status}) after {sent / 2**20:.1f} of {total_mb:g} MB sent; "
                f"server RSS +{mem.growth:.0f} MB")
        if what == "open":
            return "hang", None, note, note
        if status == 200:
            return "silent", 200, note, note
        if mem.growth > bound_mb:
            return "silent", status, note + f" (bound {bound_mb:g} MB)", note
        return "ok", status, note, note
    return judge


def _slow_case(head: bytes, deadline: float, every: float = 2.0):
    """A client that sends one byte every `every` seconds after `head`: the server must end
    the request (answer or close) within `deadline` seconds (a 60 s deadline on the whole
    request, plus grace)."""
    def judge(fx: Fixtures):
        server = fx.need("server")
        s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        t0 = time.monotonic()
        try:
            s.sendall(head)
            while time.monotonic() - t0 < deadline:
                what, status = _answer(s, every)
                if what != "open":
                    note = f"{what} (status {status}) after {time.monotonic() - t0:.0f} s"
                    return "ok", status, note, note
                try:
                    s.sendall(b"a")
                except OSError:
                    note = f"closed after {time.monotonic() - t0:.0f} s"
                    return "ok", None, note, note
        finally:
            s.close()
        note = f"still open after {deadline:g} s of one byte every {every:g} s"
        return "hang", None, note, note
    return judge


def _serve_start(model: Path, *args: str, expected=2, ready_s: float = 120):
    """`resnetkit serve MODEL ARGS`: it must exit with `expected`, or (where 0 is expected)
    may start serving; a server that starts where it should have refused is "silent"."""
    expected = expected if isinstance(expected, tuple) else (expected,)

    def judge(fx: Fixtures):
        s = Server(model, *args, ready_s=ready_s, fixture=False)
        out, code = s.output(), s.proc.returncode
        s.close()
        if s.state == "ready":
            note = "started serving"
            return ("ok" if 0 in expected else "silent"), None, note, note
        if s.state == "not ready":
            return "hang", None, _last(out), f"neither ready nor exited within {ready_s:g} s"
        return verdict(code, out, expected, None, None, None), code, _last(out), None
    return judge


def _black_png(side: int) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.new("L", (side, side)).save(buf, "PNG")
    return buf.getvalue()


def _upload(port: int, body: bytes, multipart: bool, results: list, timeout: float = 120) -> None:
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        if multipart:
            b = b"----campaign"
            body = (b"--" + b + b'\r\nContent-Disposition: form-data; name="file"; '
                    b'filename="x.png"\r\nContent-Type: image/png\r\n\r\n' + body +
                    b"\r\n--" + b + b"--\r\n")
            kind = "multipart/form-data; boundary=" + b.decode()
        else:
            kind = "image/png"
        c.request("POST", "/predict", body=body, headers={"Content-Type": kind})
        results.append(c.getresponse().status)
        c.close()
    except (OSError, http.client.HTTPException) as e:
        results.append(type(e).__name__)


def _event_loop_case(n: int, side: int, multipart: bool, bound_s: float = 0.5):
    """n concurrent uploads of a small PNG of side x side pixels while /health is polled:
    every upload answered 200, and /health never slower than bound_s."""
    def judge(fx: Fixtures):
        server = fx.need("server")
        body = _black_png(side)
        results: list = []
        uploads = [threading.Thread(target=_upload, args=(server.port, body, multipart, results))
                   for _ in range(n)]
        worst, failed = 0.0, 0
        for t in uploads:
            t.start()
        while any(t.is_alive() for t in uploads):
            status, took = server.health(10)
            worst = max(worst, took)
            failed += status != 200
            time.sleep(0.05)
        for t in uploads:
            t.join()
        ok200 = sum(r == 200 for r in results)
        note = (f"{n} uploads of {len(body) / 1e3:.0f} KB ({side}x{side}): {ok200} answered "
                f"200 ({sorted(set(map(str, results)))}); /health max {worst:.2f} s, "
                f"{failed} failed")
        if worst >= bound_s or failed:
            return "hang", None, note, note
        if ok200 != n:
            return "silent", None, note, note
        return "ok", None, note, note
    return judge


# ---- the case list ------------------------------------------------------------------------

def _copy_run(src: Path, dst: Path, edit: Callable[[dict], Any] | None = None,
              text: str | None = None) -> None:
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    cfg = dst / "config.json"
    if text is not None:
        cfg.write_text(text)
    elif edit is not None:
        info = json.loads(cfg.read_text())
        edit(info)
        cfg.write_text(json.dumps(info))


def _mkfifo(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        path.unlink()
    os.mkfifo(path)


def _top1(out: str) -> float | None:
    try:
        return json.loads(out[out.index("{"):out.rindex("}") + 1])["top1"]
    except (ValueError, KeyError, TypeError):
        return None


def cases(d: Path, f: dict[str, Path]) -> list[Case]:
    out = str(d / "runs")
    c = [Case(n, a, e, (lambda ch: (lambda _out: ch()))(ch) if ch else None,
              needs=("exp",) if n in ("train same name again", "resume non-numeric epochs",
                                      "resume changes lr") else (),
              keep=[d / "runs" / "exp"] if n == "train same name again" else [])
         for n, a, e, ch in original_cases(d, f, out)]
    c += hostile_text_cases(d, f)
    c += climbing_cases(d)
    c += data_loss_cases(d, f)
    c += hang_and_memory_cases(d, f)
    c += server_cases()
    c += silently_wrong_cases(d, f)
    c += traceback_cases(d, f)
    c += broken_cases(d, f)
    return c


def original_cases(d: Path, f: dict[str, Path], out: str):
    """(name, args, expected exit code, extra check) for each case."""
    c = []
    for name in ("huge_layers", "huge_image", "bad_json", "unknown_key", "wrong_classes",
                 "std_zero", "wrong_type", "inf", "random", "empty_pth"):
        c.append((f"predict {name}", ["predict", str(f[name]), str(f["img"])], 2, None))
    for name in ("evil.pth", "evil.pdparams"):
        c.append((f"convert {name}", ["weights", "convert", str(f[name]), "-o", str(d / "x.safetensors")], 2,
                  lambda: not (d / "PWNED").exists()))
    c += [
        ("predict good", ["predict", str(f["good"]), str(f["img"])], 0, None),
        ("predict broken image", ["predict", str(f["good"]), str(f["broken"])], 2, None),
        ("predict huge image", ["predict", str(f["good"]), str(f["bomb"])], 2, None),
        ("eval 10-class on 1000-class tag", ["eval", "resnet18.tv1_in1k"], 2, None),
        ("weights download offline", ["weights", "download", "resnet18.tv1_in1k"], 2,
         lambda: not any((d / "cache").glob("*"))),
        ("weights unknown tag", ["weights", "download", "resnet18.nope"], 2, None),
        ("train lr inf", ["train", *TINY, "--lr", "inf", "--out_dir", out, "--name", "a"], 2, None),
        ("train diverges", ["train", *TINY, "--lr", "1e6", "--epochs", "2", "--out_dir", out,
                            "--name", "nan"], 2, None),
        ("train num_classes override", ["train", *TINY[:2], "--model_overrides", "num_classes=3",
                                        *TINY[4:], "--out_dir", out, "--name", "b"], 2, None),
        ("train negative momentum", ["train", *TINY, "--momentum", "-1", "--out_dir", out,
                                     "--name", "c"], 2, None),
        ("train first run", ["train", *TINY, "--epochs", "1", "--out_dir", out, "--name", "exp"], 0, None),
        ("train same name again", ["train", *TINY, "--epochs", "1", "--out_dir", out,
                                   "--name", "exp"], 2, None),
        ("resume non-numeric epochs", ["train", "--resume", f"{out}/exp", "--epochs", "two"], 2, None),
        ("resume changes lr", ["train", "--resume", f"{out}/exp", "--lr", "1"], 2, None),
        ("resume missing folder", ["train", "--resume", f"{out}/nope"], 2, None),
        ("export to a file's subfolder", ["export", "resnet20", "in_chans=1", "--image-size", "28",
                                          "-o", str(f["img"] / "x.onnx")], 2, None),
        ("describe too small", ["describe", "resnet50", "maxpool_padding=0", "--image-size", "1"],
         2, None),
        ("bad override", ["describe", "resnet50", "groups=two"], 2, None),
        ("unknown model", ["describe", "resnet5"], 2, None),
        ("abbreviated option", ["train", "--epoch", "3"], 2, None),
        ("freeze unknown part", ["train", *TINY, "--freeze", "layer9", "--out_dir", out,
                                 "--name", "f"], 2, None),
    ]
    return c


def hostile_text_cases(d: Path, f: dict[str, Path]) -> list[Case]:
    """Class 1: untrusted text (class names, file and folder names, metadata) printed."""
    ok_or_refused = (0, 2)
    names = [str(Path("hostile_imgs") / f"{n}.png") for n in HOSTILE_NAMES[:8]]
    recipe_name = d / "recipes" / "hostile_name.toml"
    recipe_model = d / "recipes" / "hostile_model.toml"
    recipe_name.parent.mkdir(exist_ok=True)
    recipe_name.write_text('name = "zz1\\u001b[2Jzz1"\nepochs = 1\n')
    recipe_model.write_text('model = "zz2\\u001b[31mzz2"\n')
    hostile_folder = f"folder:{f['hostile_folder']}"
    return [
        Case("escape: predict prints hostile class names", ["predict", str(f["hostile"]),
             str(f["img"]), "--top-k", "10"], ok_or_refused, hostile=HOSTILE, cwd=d),
        Case("escape: predict an ONNX file with hostile class names",
             ["predict", str(d / "hostile.onnx"), str(f["img"]), "--top-k", "10"],
             ok_or_refused, hostile=HOSTILE, needs=("onnx",), cwd=d),
        Case("escape: eval per-class table of hostile class folders",
             ["eval", str(f["hostile_dir"]), "--dataset", hostile_folder], ok_or_refused,
             hostile=HOSTILE_NAMES),
        Case("escape: train on hostile class folders",
             ["train", *FOLDER_TINY, "--dataset", hostile_folder, "--out_dir",
              str(d / "runs"), "--name", "hostile-folders"], ok_or_refused,
             hostile=HOSTILE_NAMES),
        Case("escape: eval a run trained on hostile class folders",
             ["eval", str(d / "fx" / "hrun"), "--dataset", hostile_folder], ok_or_refused,
             hostile=HOSTILE_NAMES, needs=("hostile_run",)),
        Case("escape: predict with a run trained on hostile class folders",
             ["predict", str(d / "fx" / "hrun"), str(f["img"]), "--top-k", "10"],
             ok_or_refused, hostile=HOSTILE_NAMES, needs=("hostile_run",), cwd=d),
        Case("escape: predict a folder of hostile file names",
             ["predict", str(f["good"]), "hostile_imgs", "--top-k", "1"], ok_or_refused,
             hostile=HOSTILE_NAMES[:8], cwd=d),
        Case("escape: predict hostile file names given one by one",
             ["predict", str(f["good"]), *names, "--top-k", "1"], ok_or_refused,
             hostile=HOSTILE_NAMES[:8], cwd=d),
        Case("escape: missing image with a hostile name",
             ["predict", str(f["good"]), "zz1\x1b[2Jzz1.png"], 2, hostile=["zz1\x1b[2Jzz1"], cwd=d),
        Case("escape: missing image with a line break in its name",
             ["predict", str(f["good"]), "zz3\nFAKE ROW.png"], 2, hostile=["zz3\nFAKE ROW"], cwd=d),
        Case("escape: eval title of a hostile run folder name",
             ["eval", str(f["hostile_run"])], ok_or_refused,
             hostile=["zzP\x1b[2J[red]zzR"]),
        Case("escape: eval a missing hostile dataset folder",
             ["eval", str(f["good"]), "--dataset", "folder:zz2\x1b[31mzz2"], 2,
             hostile=["zz2\x1b[31mzz2"], cwd=d),
        Case("escape: eval an image folder with a hostile empty class",
             ["eval", str(f["good"]), "--dataset", f"folder:{f['hostile_empty']}"], 2,
             hostile=["zz1\x1b[2Jzz1"]),
        Case("escape: unknown weights tag with control characters",
             ["weights", "download", "resnet18.zz1\x1b[2Jzz1"], 2, hostile=["zz1\x1b[2Jzz1"]),
        Case("escape: unknown model with control characters",
             ["describe", "zz2\x1b[31mzz2"], 2, hostile=["zz2\x1b[31mzz2"]),
        Case("escape: export into a hostile missing folder",
             ["export", "resnet20", "-o", "zz1\x1b[2Jzz1/x.onnx"], 2, hostile=["zz1\x1b[2Jzz1"],
             cwd=d),
        Case("escape: recipe names its run with control characters",
             ["train", "--recipe", str(recipe_name), *TINY, "--out_dir", str(d / "runs")],
             ok_or_refused, hostile=["zz1\x1b[2Jzz1"]),
        Case("escape: recipe names a model with control characters",
             ["train", "--recipe", str(recipe_model), "--out_dir", str(d / "runs")], 2,
             hostile=["zz2\x1b[31mzz2"]),
    ]


def climbing_cases(d: Path) -> list[Case]:
    """Class 2: a run's name (command line or recipe) that leads out of --out_dir."""
    c = []
    root = d / "climb"

    def case(label, name=None, recipe=None):
        box = root / label.replace(" ", "_")
        box.mkdir(parents=True, exist_ok=True)
        args = ["train", *TINY, "--epochs", "1", "--out_dir", str(box / "runs")]
        if recipe is not None:
            (box / "r.toml").write_text(recipe)
            args = ["train", "--recipe", str(box / "r.toml"), *TINY, "--epochs", "1",
                    "--out_dir", str(box / "runs")]
        if name is not None:
            args += ["--name", name if name != "ABS" else str(box / "abs")]
        c.append(Case(f"climb: {label}", args, 2, sandbox=(root, box / "runs"),
                      timeout=120))
    case("--name ../x", "../x")
    case("--name ../../x", "../../x")
    case("--name ..", "..")
    case("--name absolute", "ABS")
    case("--name a/b", "a/b")
    case("recipe name ../escape", recipe='name = "../escape"\n')
    case("recipe name with a NUL", recipe='name = "x\\u0000y"\n')
    return c


def data_loss_cases(d: Path, f: dict[str, Path]) -> list[Case]:
    """Class 3 and 4: files that are not the program's, in its way."""
    c = []
    base = d / "loss"

    def not_a_run(label, files: dict[str, bytes]):
        box = base / label.replace(" ", "_")
        run_dir = box / "N"
        run_dir.mkdir(parents=True, exist_ok=True)
        for n, b in files.items():
            (run_dir / n).write_bytes(b)
        c.append(Case(f"loss: train into {label}", ["train", *TINY, "--epochs", "1",
                                                    "--out_dir", str(box), "--name", "N"],
                      2, keep=[run_dir], timeout=120))
    not_a_run("a folder with a user's files", {"best.safetensors": os.urandom(256),
                                               "curves.png": os.urandom(256),
                                               "notes.txt": b"my notes\n"})
    not_a_run("a folder with a user's metrics.jsonl", {"metrics.jsonl": b'{"mine": 1}\n'})
    not_a_run("a folder with a user's dotfile named .x.partial",
              {".draft.partial": b"unsaved work\n", "notes.txt": b"x\n"})
    box = base / "resume_not_a_run"
    (box / "N").mkdir(parents=True, exist_ok=True)
    (box / "N" / "last.safetensors").write_bytes(b"mine")
    (box / "N" / "metrics.jsonl").write_bytes(b"mine\n")
    c.append(Case("loss: resume a folder that is not a run", ["train", "--resume", str(box / "N")],
                  2, keep=[box / "N"]))

    # convert and export without -o: the default name in the current folder exists
    for label, src, existing in (("convert a .pth", f["tv"], "tv.safetensors"),
                                 ("convert a .pdparams", f["paddle"], "pd.safetensors")):
        cwd = base / f"cwd_{existing.split('.')[0]}"
        cwd.mkdir(parents=True, exist_ok=True)
        (cwd / existing).write_bytes(b"precious, not a checkpoint\n")
        c.append(Case(f"loss: {label} without -o over an existing file",
                      ["weights", "convert", str(src)], 2, cwd=cwd, keep=[cwd / existing]))
    cwd = base / "cwd_export"
    cwd.mkdir(parents=True, exist_ok=True)
    (cwd / "good.onnx").write_bytes(b"precious, not a model\n")
    c.append(Case("loss: export without -o over an existing file", ["export", str(f["good"])],
                  2, cwd=cwd, keep=[cwd / "good.onnx"]))
    return c


def hang_and_memory_cases(d: Path, f: dict[str, Path]) -> list[Case]:
    """Class 7 (FIFOs named like inputs) and 8 (networks and counts too large for memory,
    run under the address-space limit)."""
    fifo = d / "fifo"
    fifo.mkdir(exist_ok=True)
    _png(fifo / "dir" / "a.png")
    _mkfifo(fifo / "x.png")
    _mkfifo(fifo / "dir" / "y.png")
    _mkfifo(fifo / "x.safetensors")
    _mkfifo(fifo / "r.toml")
    _png(fifo / "classes" / "train" / "a" / "0.png")
    _png(fifo / "classes" / "train" / "a" / "1.png", value=10)
    _png(fifo / "classes" / "train" / "b" / "0.png", value=200)
    _png(fifo / "classes" / "train" / "b" / "1.png", value=220)
    _mkfifo(fifo / "classes" / "train" / "b" / "2.png")
    shutil.copytree(fifo / "classes" / "train", fifo / "classes" / "test", dirs_exist_ok=True,
                    ignore=lambda *_: ["2.png"])
    _mkfifo(fifo / "classes" / "test" / "b" / "2.png")
    if (fifo / "ckpt.safetensors").exists():
        (fifo / "ckpt.safetensors").unlink()
    (fifo / "ckpt.safetensors").symlink_to(f["good"])
    if (fifo / "zero.png").is_symlink():
        (fifo / "zero.png").unlink()
    (fifo / "zero.png").symlink_to("/dev/zero")
    fifo_run = fifo / "run"

    def make_fifo_run():
        run_dir = Fixtures.need(FX, "run")
        shutil.rmtree(fifo_run, ignore_errors=True)
        shutil.copytree(run_dir, fifo_run)
        _mkfifo(fifo_run / "config.json")

    hang = dict(timeout=HANG_S)
    mem = dict(memlimit=True, timeout=120)
    api = "import resnetkit as rk\n"
    two_class = ["--dataset", f"folder:{fifo / 'classes'}"]
    return [
        Case("fifo: predict a FIFO named x.png", ["predict", str(f["good"]), str(fifo / "x.png")],
             2, **hang),
        Case("fifo: predict a folder holding a FIFO",
             ["predict", str(f["good"]), str(fifo / "dir")], 2, **hang),
        Case("fifo: predict with a FIFO as the checkpoint",
             ["predict", str(fifo / "x.safetensors"), str(f["img"])], 2, **hang),
        Case("fifo: train --recipe a FIFO", ["train", "--recipe", str(fifo / "r.toml")], 2, **hang),
        Case("fifo: resume a run whose config.json is a FIFO", ["train", "--resume", str(fifo_run)],
             2, setup=make_fifo_run, needs=("run",), **hang),
        Case("fifo: eval an image folder holding a FIFO",
             ["eval", str(f["two_class"]), *two_class], (0, 2), **hang),
        Case("fifo: predict /dev/zero named like an image",
             ["predict", str(fifo / "ckpt.safetensors"), str(fifo / "zero.png")], 2, **hang),
        Case("memory: export a very wide resnet50",
             ["export", "resnet50", "widths=4096,8192,16384,16384", "--image-size", "32",
              "-o", str(d / "wide.onnx")], 2, **mem),
        Case("memory: export resnet50 with a huge width_per_group",
             ["export", "resnet50", "width_per_group=10000000", "--image-size", "32",
              "-o", str(d / "wide.onnx")], 2, **mem),
        Case("memory: export resnet50 widths=4096 x4 (within the width bound)",
             ["export", "resnet50", "widths=4096,4096,4096,4096", "--image-size", "32",
              "-o", str(d / "wide.onnx")], 2, **mem),
        Case("memory: export resnet50 width_per_group=2048 (within the width bound)",
             ["export", "resnet50", "width_per_group=2048", "--image-size", "32",
              "-o", str(d / "wide.onnx")], 2, **mem),
        Case("memory: API create_model resnet18 with widths 16384", python=api +
             "rk.create_model('resnet18', widths=(16384,) * 4)", **mem),
        Case("memory: train with huge widths",
             ["train", *TINY[:2], "--model_overrides", "widths=99999,99999,99999", *TINY[4:],
              "--epochs", "1", "--out_dir", str(d / "runs"), "--name", "wide"], 2, **mem),
        Case("memory: train with 100000 blocks a stage",
             ["train", *TINY[:2], "--model_overrides",
              "layers=100000,1,1;widths=4,8,8;stem_width=4", *TINY[4:], "--epochs", "1",
              "--out_dir", str(d / "runs"), "--name", "deep"], 2, **mem),
        Case("memory: API create_model with widths 16384", python=api +
             "rk.create_model('resnet50', widths=(16384,) * 4)", **mem),
        Case("memory: API create_model with 100000 blocks a stage", python=api +
             "rk.create_model('resnet50', layers=(100000,) * 4)", **mem),
        Case("memory: API create_model with a billion classes", python=api +
             "rk.create_model('resnet18', num_classes=10**9)", **mem),
        Case("memory: quantize on 99999999999 calibration images",
             ["quantize", str(f["good"]), "--calibration", "fashion-mnist:99999999999", "-o",
              str(d / "q.onnx")], 2, check=lambda _: not (d / "q.onnx").exists(),
             setup=lambda: (d / "q.onnx").unlink(missing_ok=True), memlimit=True, timeout=90),
    ]


def server_cases() -> list[Case]:
    """Class 5 (headers, slow clients) and 6 (decoding on the event loop) against one
    `resnetkit serve` of the tiny checkpoint (restarted when a case killed it)."""
    spread = lambda: (b"X-Pad-%d: %s\r\n" % (i, b"a" * 8184) for i in range(8192))  # 64 MB
    one = lambda: (b"X-Big: " + b"a" * (1 << 20) if i == 0 else b"a" * (1 << 20)
                   if i < 16 else b"\r\n" for i in range(17))  # one 16 MB header, 1 MB at a time
    many = lambda: (b"h%d: v\r\n" % i for i in range(300_000))  # 300k tiny lines, ~3 MB
    srv = dict(needs=("server",))
    get_head = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "
    post_head = (b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
                 b"Content-Length: 100000\r\n\r\n")
    return [
        Case("serve: 64 MB of headers over 8192 lines", special=_flood_case(spread, 64, 32), **srv),
        Case("serve: one 16 MB header", special=_flood_case(one, 16, 32), **srv),
        Case("serve: 300000 header lines", special=_flood_case(many, 3, 32), **srv),
        Case("serve: headers one byte every 2 s", special=_slow_case(get_head, 70), **srv),
        Case("serve: body one byte every 2 s", special=_slow_case(post_head, 70), **srv),
        Case("serve: 40 uploads of 6000x6000 PNGs, /health latency",
             special=_event_loop_case(40, 6000, False), **srv),
        Case("serve: 40 multipart uploads of 6000x6000 PNGs, /health latency",
             special=_event_loop_case(40, 6000, True), **srv),
    ]


def silently_wrong_cases(d: Path, f: dict[str, Path]) -> list[Case]:
    """Class 9 (train and test class sets differ), 10 (finite but huge weights), 11
    (calibration counts that are not whole numbers)."""
    differ, extra = f"folder:{d / 'classes_differ'}", f"folder:{d / 'classes_extra'}"
    names_cherry = lambda out: "cherry" in out
    names_file = lambda name: (lambda out: name in out)
    c = [
        Case("classes: train where test classes differ (apple,banana / banana,cherry)",
             ["train", *FOLDER_TINY, "--dataset", differ, "--out_dir", str(d / "runs"),
              "--name", "differ"], 2, check=names_cherry),
        Case("classes: train where test has an extra class cherry",
             ["train", *FOLDER_TINY, "--dataset", extra, "--out_dir", str(d / "runs"),
              "--name", "extra"], 2, check=names_cherry),
        Case("classes: eval apple,banana model on banana,cherry test folder",
             ["eval", str(f["two_class"]), "--dataset", differ], 2, check=names_cherry),
        # the model knows some of the folder's classes: judged on those (exit 0) only where
        # the output says which class was left out
        Case("classes: eval apple,banana model on a test folder with cherry too",
             ["eval", str(f["two_class"]), "--dataset", extra], (0, 2), check=names_cherry),
        Case("classes: eval --engine onnxruntime on banana,cherry test folder",
             ["eval", str(f["two_class"]), "--dataset", differ, "--engine", "onnxruntime"], 2,
             check=names_cherry),
        Case("huge weights: predict fc.weight 3e38", ["predict", str(f["huge_fc"]), str(f["img"])],
             2, check=names_file("huge_fc")),
        Case("huge weights: predict --json fc.weight 3e38",
             ["predict", str(f["huge_fc"]), str(f["img"]), "--json"], 2,
             check=names_file("huge_fc")),
        Case("huge weights: predict all weights 3e38",
             ["predict", str(f["huge_all"]), str(f["img"])], 2, check=names_file("huge_all")),
        Case("huge weights: eval fc.weight 3e38", ["eval", str(f["huge_fc"])], 2,
             check=names_file("huge_fc")),
        Case("huge weights: eval all weights 3e38", ["eval", str(f["huge_all"])], 2,
             check=names_file("huge_all")),
        Case("huge weights: eval --engine onnxruntime fc.weight 3e38",
             ["eval", str(f["huge_fc"]), "--engine", "onnxruntime", "--precision", "fp32"], 2,
             check=names_file("huge_fc")),
    ]
    q = d / "calib.onnx"
    for count in ("abc", "2.5", "-3", "0", "1e3", "+5", "\u00b2", "9" * 1000, "9" * 5000):
        shown = count if len(count) < 12 else f"{len(count)} digits"
        c.append(Case(f"calibration count {shown}",
                      ["quantize", str(f["good"]), "--calibration", f"fashion-mnist:{count}",
                       "-o", str(q)], 2, check=lambda _: not q.exists(),
                      setup=lambda: q.unlink(missing_ok=True), memlimit=True, timeout=90))
    c.append(Case("calibration count 2.5 in eval --precision int8",
                  ["eval", str(f["good"]), "--engine", "torch", "--precision", "int8",
                   "--calibration", "fashion-mnist:2.5"], 2, memlimit=True, timeout=90))
    return c


def traceback_cases(d: Path, f: dict[str, Path]) -> list[Case]:
    """Hostile metadata nested too deep, odd preprocessing, odd foreign files, negative
    threads, oversized sizes, and the Python API."""
    c = []
    img = str(f["img"])
    xs = str(d / "x.safetensors")
    for name in ("nested_config", "nested_classes", "nested_preprocess"):
        p = str(f[name])
        c += [Case(f"nested JSON: predict {name}", ["predict", p, img]),
              Case(f"nested JSON: eval {name}", ["eval", p]),
              Case(f"nested JSON: convert {name}", ["weights", "convert", p, "-o", xs]),
              Case(f"nested JSON: export {name}", ["export", p, "-o", str(d / "n.onnx")])]
    c.append(Case("nested JSON: serve nested_config",
                  special=_serve_start(f["nested_config"])))
    for name in ("nested_classes", "nested_preprocess"):
        p = str(d / f"{name}.onnx")
        c += [Case(f"nested JSON: predict ONNX {name}", ["predict", p, img], needs=("onnx",)),
              Case(f"nested JSON: eval ONNX {name}", ["eval", p], needs=("onnx",)),
              Case(f"nested JSON: serve ONNX {name}", special=_serve_start(Path(p)),
                   needs=("onnx",))]
    nested_run = d / "runs" / "nested-config"

    def nested_setup(text=NESTED):
        return lambda: _copy_run(FX.need("run"), nested_run, text=text)
    for label, args in (("train --resume", ["train", "--resume", str(nested_run)]),
                        ("eval", ["eval", str(nested_run)]),
                        ("predict", ["predict", str(nested_run), img]),
                        ("convert", ["weights", "convert", str(nested_run), "-o", xs])):
        c.append(Case(f"nested JSON: {label} a run with a nested config.json", args,
                      (0, 2) if label != "train --resume" else 2, needs=("run",),
                      setup=nested_setup()))
    c.append(Case("nested JSON: serve a run with a nested config.json",
                  special=_serve_start(nested_run, expected=(0, 2)), needs=("run",),
                  setup=nested_setup()))
    c.append(Case("nested JSON: train --resume a run whose config.json nests train",
                  ["train", "--resume", str(nested_run)], needs=("run",),
                  setup=nested_setup('{"train": ' + NESTED)))

    # preprocessing metadata
    for name in ("size0", "no_preprocess", "no_mean"):
        p = str(f[name])
        c += [Case(f"preprocess {name}: predict two sizes", ["predict", p, img, str(f["img40"])],
                   (0, 2)),
              Case(f"preprocess {name}: eval", ["eval", p], (0, 2)),
              Case(f"preprocess {name}: eval --engine onnxruntime",
                   ["eval", p, "--engine", "onnxruntime", "--precision", "fp32"], (0, 2)),
              Case(f"preprocess {name}: export", ["export", p, "-o", str(d / "pre.onnx")], (0, 2)),
              Case(f"preprocess {name}: quantize",
                   ["quantize", p, "--calibration", "fashion-mnist:32", "-o",
                    str(d / "pre.q.onnx")], (0, 2), memlimit=True, timeout=120)]
    c.append(Case("preprocess no_preprocess: serve", special=_serve_start(f["no_preprocess"])))

    # foreign files with odd keys
    for name in ("v2_partial", "odd_keys"):
        p = str(f[name])
        c += [Case(f"foreign {name}: convert", ["weights", "convert", p, "-o", xs]),
              Case(f"foreign {name}: predict", ["predict", p, img]),
              Case(f"foreign {name}: train --init", ["train", *TINY, "--epochs", "1", "--init",
                                                      p, "--out_dir", str(d / "runs"),
                                                      "--name", f"init-{name}"]),
              Case(f"foreign {name}: API create_model(checkpoint_path=)", python=(
                  f"import resnetkit as rk\nrk.create_model('resnet18', checkpoint_path={p!r})"))]

    # negative thread counts
    threads_run = d / "runs" / "threads-config"
    c += [
        Case("threads: train --threads -1", ["train", *TINY, "--epochs", "1", "--threads", "-1",
                                             "--out_dir", str(d / "runs"), "--name", "thr"]),
        Case("threads: serve --threads -1", special=_serve_start(f["good"], "--threads", "-1")),
        Case("threads: resume a run whose config.json says threads -1",
             ["train", "--resume", str(threads_run), "--epochs", "3"], needs=("run",),
             setup=lambda: _copy_run(FX.need("run"), threads_run,
                                     edit=lambda i: i["train"].update(threads=-1))),
    ]

    # oversized sizes: analysis verbs, export, overrides (under the address-space limit)
    mem = dict(memlimit=True, timeout=90)
    big = "10000000"
    c += [
        Case("size: describe --image-size 10000000", ["describe", "resnet50", "--image-size", big],
             (0, 2), **mem),
        Case("size: summary --image-size 10000000", ["summary", "resnet50", "--image-size", big],
             (0, 2), **mem),
        Case("size: flops --image-size 10000000", ["flops", "resnet50", "--image-size", big],
             (0, 2), **mem),
        Case("size: flops --block at 10000000", ["flops", "--block", "basic:99999999",
                                                 "--image-size", big], (0, 2), **mem),
        Case("size: compare --image-size 10000000", ["compare", "resnet50", "resnet18",
                                                     "--image-size", big], (0, 2), **mem),
        Case("size: diagram --image-size 10000000", ["diagram", "resnet50", "--image-size", big,
                                                     "-o", str(d / "big.svg")], (0, 2), **mem),
        Case("size: export --image-size 999999", ["export", "resnet20", "--image-size", "999999",
                                                  "-o", str(d / "big.onnx")], 2, **mem),
        Case("size: describe widths=99999999,1,1,1", ["describe", "resnet50",
                                                      "widths=99999999,1,1,1"], (0, 2), **mem),
        Case("size: summary widths=99999999,1,1,1", ["summary", "resnet50",
                                                     "widths=99999999,1,1,1"], (0, 2), **mem),
        Case("size: describe layers=999999,1,1,1", ["describe", "resnet50",
                                                    "layers=999999,1,1,1"], (0, 2), **mem),
        Case("size: summary layers=999999,1,1,1", ["summary", "resnet50",
                                                   "layers=999999,1,1,1"], (0, 2), **mem),
        Case("size: summary --batch -1", ["summary", "resnet20", "--batch", "-1"], 2, **mem),
    ]

    # the Python API (ValueError: refused cleanly; anything else: a traceback)
    api = "import torch, resnetkit as rk\n"
    nan_calibration = PY_TINY + (
        "from resnetkit.infer.optimize import optimize\n"
        "x = torch.full((8, 1, 28, 28), float('nan'))\n"
        "q = optimize(m, precision='int8', engine='torch', calibration=x, compile=False)\n"
        "y = q(torch.zeros(2, 1, 28, 28))\n"
        "if not torch.isfinite(y).all():\n"
        "    print('non-finite logits from NaN calibration')\n")
    c += [
        Case("API: features_only with out_indices=() then forward", python=api +
             "m = rk.create_model('resnet18', features_only=True, out_indices=())\n"
             "m(torch.zeros(1, 3, 64, 64))", expected=(0, 2)),
        Case("API: reset_classifier(-1)", python=PY_TINY + "m.reset_classifier(-1)"),
        Case("API: create_model(None)", python=api + "rk.create_model(None)"),
        Case("API: create_model with widths='abc'", python=api +
             "rk.create_model('resnet18', widths='abc')"),
        Case("API: create_model with out_indices=(9,)", python=api +
             "rk.create_model('resnet18', features_only=True, out_indices=(9,))"),
        Case("API: int8 calibration on NaN images", python=nan_calibration, memlimit=True,
             timeout=180),
        Case("API: quantize() with NaN images", python=PY_TINY + (
            "from resnetkit.infer.quantize import quantize\n"
            "quantize(m, torch.full((8, 1, 28, 28), float('nan')), compile=False)\n"),
            memlimit=True, timeout=180),
    ]
    return c


def broken_cases(d: Path, f: dict[str, Path]) -> list[Case]:
    """Found broken: a model on some of the dataset's classes on other engines and in int8,
    ONNX Runtime without --precision on a bf16 CPU, an override after -o, a config without
    widths."""
    sub = str(d / "fx" / "sub")

    def near(tol: float):
        def check(out: str) -> tuple[bool | str, str]:
            got, ref = _top1(out), FX.need("sub")
            if got is None:
                return False, f"no top-1 in the output (fp32 torch: {ref:.4f})"
            note = f"top-1 {got:.4f}, fp32 torch {ref:.4f} (tolerance {tol:g})"
            return (abs(got - ref) <= tol or "silent"), note
        return check
    json_ = ["--json"]
    return [
        Case("classes 5,6,7: eval --engine onnxruntime", ["eval", sub, "--engine", "onnxruntime",
                                                          "--precision", "fp32", *json_], 0,
             check=near(0.02), needs=("sub",)),
        Case("classes 5,6,7: eval int8 on torch", ["eval", sub, "--engine", "torch", "--precision",
                                                   "int8", "--calibration", "fashion-mnist:64",
                                                   *json_], 0,
             check=near(0.10), needs=("sub",), memlimit=True, timeout=300),
        Case("classes 5,6,7: eval int8 on onnxruntime",
             ["eval", sub, "--engine", "onnxruntime", "--precision", "int8", "--calibration",
              "fashion-mnist:64", *json_], 0, check=near(0.10), needs=("sub",), memlimit=True,
             timeout=300),
        Case("classes 5,6,7: eval --precision int8 without --engine",
             ["eval", sub, "--precision", "int8", "--calibration", "fashion-mnist:64", *json_],
             (0, 2), check=lambda out: '"precision": "int8"' in out or "error" in out,
             needs=("sub",), memlimit=True, timeout=300),
        Case("classes 5,6,7: eval its quantized ONNX file",
             ["eval", str(d / "fx" / "sub.int8.onnx"), *json_], 0, check=near(0.10),
             needs=("sub", "sub_int8"), timeout=300),
        Case("eval --engine onnxruntime without --precision (bf16 CPU)",
             ["eval", str(d / "fx" / "run"), "--engine", "onnxruntime"], 0, needs=("run",)),
        Case("export with an override after -o",
             ["export", "resnet20", "-o", str(d / "after.onnx"), "in_chans=1"], 0,
             check=lambda _: (d / "after.onnx").exists()),
        Case("checkpoint config without widths", ["predict", str(f["no_widths"]), str(f["img"])],
             (0, 2), check=lambda out: "whole numbers" not in out),
        Case("checkpoint config without layers", ["predict", str(f["no_layers"]), str(f["img"])],
             (0, 2), check=lambda out: "whole numbers" not in out),
    ]


# ---- judging ------------------------------------------------------------------------------

def verdict(code, output: str, expected, check, before, after) -> str:
    expected = expected if isinstance(expected, tuple) else (expected,)
    if code is None:
        return "hang"
    if "Traceback (most recent call last)" in output:
        return "traceback"
    if before is not None and any(after.get(k) != v for k, v in before.items()):
        return "lost"
    if code < 0 and code not in expected:
        return "killed"
    result = check() if check is not None else True
    if isinstance(result, str):
        return result
    if code not in expected or not result:
        return "silent" if code == 0 else "wrong-exit"
    return "ok"


def _last(output: str) -> str:
    last = [ln for ln in output.strip().splitlines() if ln.strip()][-1:] or [""]
    return last[0][:160]


def judge_case(case: Case, fx: Fixtures, default_timeout: float) -> dict[str, Any]:
    try:
        for n in case.needs:
            fx.need(n)
        if case.setup is not None:
            case.setup()
        if case.special is not None:
            try:
                v, code, last, note = case.special(fx)
            except OSError as e:  # the server refused a connection or reset it at once
                dead = fx.server is not None and fx.server.proc.poll() is not None
                v, code = ("killed" if dead else "wrong-exit"), None
                last = note = f"{type(e).__name__}: {e}" + (" (the server died)" if dead else "")
            return {"case": case.name, "exit": code, "verdict": v, "last_line": last[:160],
                    **({"note": note} if note else {})}
    except FixtureError as e:
        return {"case": case.name, "exit": None, "verdict": e.verdict,
                "last_line": f"setup {e.line}"[:160]}
    before = _snapshot(case.keep) if case.keep else None
    tree = _tree(case.sandbox[0]) if case.sandbox else None
    cmd = [sys.executable, "-c", PY_WRAP, case.python] if case.python else None
    code, out, err = run(case.args, case.timeout or default_timeout, cwd=case.cwd,
                         memlimit=case.memlimit, cmd=cmd)
    output = out + err
    after = _snapshot(case.keep) if case.keep else None
    note = None

    def check():
        nonlocal note
        result = case.check(output)
        if isinstance(result, tuple):
            result, note = result
        return result
    v = verdict(code, output, case.expected, check if case.check else None, before, after)
    if case.sandbox and v in ("ok", "silent", "wrong-exit", "lost"):
        root, allowed = case.sandbox
        new = sorted(p for p in _tree(root) - tree
                     if not Path(p).is_relative_to(allowed))
        if new:
            v, note = "escape-path", f"written outside {allowed}: {', '.join(new[:3])}"
    if case.hostile and v in ("ok", "silent", "wrong-exit"):
        raw = escaped(output, case.hostile)
        if raw:
            v, note = "escape", raw
    # the error's sentence where it failed, the result's last line where it worked
    last = _last(err) if (code != 0 and err.strip()) or not out.strip() else _last(out)
    row = {"case": case.name, "exit": code, "verdict": v,
           "last_line": ascii(last)[1:-1] if case.hostile else last}
    if note:
        row["note"] = note[:200]
    return row


FX: Fixtures  # the campaign's fixtures, for the setups that need them


def main() -> None:
    global FX
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--timeout", type=float, default=180)
    ap.add_argument("--only", default=None, metavar="SUBSTRING",
                    help="run only the cases whose name holds this (case-insensitive)")
    a = ap.parse_args()
    d = Path(a.out or tempfile.mkdtemp(prefix="campaign-"))
    d.mkdir(parents=True, exist_ok=True)
    for sub in ("runs", "climb", "loss"):  # what the cases wrote last time (fixtures stay)
        shutil.rmtree(d / sub, ignore_errors=True)
    os.environ["RESNETKIT_CACHE"] = str(d / "cache")
    f = make_files(d)
    FX = fx = Fixtures(d, f, a.timeout)
    selected = [c for c in cases(d, f)
                if a.only is None or a.only.lower() in c.name.lower()]
    table = []
    try:
        for case in selected:
            if "server" not in case.needs and fx.server is not None:
                fx.close()  # the server's cases are done: free its cores and memory
            t = time.monotonic()
            table.append(judge_case(case, fx, a.timeout))
            print(f"{time.monotonic() - t:6.1f} s  {table[-1]['verdict']:<11} {case.name}",
                  file=sys.stderr, flush=True)
    finally:
        fx.close()
    # SIGTERM during training: saved, resumable, exit 143
    if a.only is None or a.only.lower() in "sigterm during training":
        code, out, err = run(["train", *TINY, "--epochs", "500", "--out_dir", str(d / "runs"),
                              "--name", "term"], a.timeout, signal_after=15)
        output = out + err
        saved = (d / "runs" / "term" / "last.state.pt").exists()
        table.append({"case": "SIGTERM during training", "exit": code,
                      "verdict": "ok" if code == 143 and saved and "--resume" in output else
                      verdict(code, output, 143, lambda: saved, None, None),
                      "last_line": output.strip().splitlines()[-1][:160] if output.strip() else ""})
    counts = {}
    for row in table:
        counts[row["verdict"]] = counts.get(row["verdict"], 0) + 1
    print(json.dumps({"cases": table, "counts": counts, "total": len(table)}, indent=1))


if __name__ == "__main__":
    main()
