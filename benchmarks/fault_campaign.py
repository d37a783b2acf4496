"""The hostile-input and fault campaign: each case runs `resnetkit` in a fresh process on a
bad input or under a fault and is judged by its outcome. Prints a JSON table (case, exit
code, verdict) and the counts of each verdict.

Verdicts: "ok" (one clear sentence and the expected exit code, or the expected success),
"traceback" (a Python traceback reached the user), "hang" (still running after the time
limit), "silent" (exit 0 where an error was due, or a wrong result), "lost" (a file that
existed before was damaged or a partial file was left behind).

    python benchmarks/fault_campaign.py [--out DIR] [--timeout 120]
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

TINY = ["--model", "resnet20", "--model_overrides", "widths=4,8,8;stem_width=4",
        "--train_subset", "256", "--test_subset", "100", "--batch_size", "64",
        "--precision", "fp32", "--plots", "false"]


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()} if d.exists() else {}


def run(args: list[str], timeout: float, env: dict | None = None, signal_after: float = 0,
        sig: int = signal.SIGTERM) -> tuple[int | None, str]:
    p = subprocess.Popen([sys.executable, "-m", "resnetkit", *args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
    try:
        if signal_after:
            time.sleep(signal_after)
            p.send_signal(sig)
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        return None, ""
    return p.returncode, out + err


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
    classes = [str(i) for i in range(10)]

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
    return f


def cases(d: Path, f: dict[str, Path]):
    """(name, args, expected exit code, extra check) for each case."""
    out = str(d / "runs")
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
                                   "--name", "exp"], 2, "keep:exp"),
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


def verdict(code, output: str, expected: int, check, before, after) -> str:
    if code is None:
        return "hang"
    if "Traceback (most recent call last)" in output:
        return "traceback"
    if before is not None and any(after.get(k) != v for k, v in before.items()):
        return "lost"
    if code != expected or (check is not None and not check()):
        return "silent" if code == 0 else "wrong-exit"
    return "ok"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--timeout", type=float, default=180)
    a = ap.parse_args()
    d = Path(a.out or tempfile.mkdtemp(prefix="campaign-"))
    d.mkdir(parents=True, exist_ok=True)
    os.environ["RESNETKIT_CACHE"] = str(d / "cache")
    f = make_files(d)
    table = []
    for name, args, expected, check in cases(d, f):
        before = None
        if check == "keep:exp":
            before, check = _files(d / "runs" / "exp"), None
        code, output = run(args, a.timeout)
        after = _files(d / "runs" / "exp") if before is not None else None
        v = verdict(code, output, expected, check, before, after)
        last = [ln for ln in output.strip().splitlines() if ln.strip()][-1:] or [""]
        table.append({"case": name, "exit": code, "verdict": v, "last_line": last[0][:160]})
    # SIGTERM during training: saved, resumable, exit 143
    code, output = run(["train", *TINY, "--epochs", "500", "--out_dir", str(d / "runs"),
                        "--name", "term"], a.timeout, signal_after=15)
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
