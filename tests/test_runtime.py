"""The allocator setting: it must remove the page faults of repeated forward passes.
Each case runs in a fresh interpreter, since the setting is process-wide."""
import json
import os
import subprocess
import sys

import pytest

from resnetkit.runtime import _libc

PROBE = """
import json, resource, sys, torch, resnetkit
state = resnetkit.tune_allocator()
torch.set_num_threads(1)
m = resnetkit.create_model("resnet18").eval()
x = torch.randn(4, 3, 160, 160)   # activations of 1.6 to 6.5 MB
with torch.inference_mode():
    m(x); m(x)
    a = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        m(x)
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - a) / 3
print(json.dumps({"state": state, "faults": faults}))
"""


def probe(env_value: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RESNETKIT_ALLOCATOR"}
    if env_value is not None:
        env["RESNETKIT_ALLOCATOR"] = env_value
    r = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(_libc() is None, reason="the C library is not glibc")
def test_tuned_allocator_removes_the_page_faults_of_each_pass():
    tuned, system = probe(None), probe("system")
    assert tuned["state"]["allocator"] == "glibc-tuned"
    assert tuned["state"]["mmap_threshold"] == 32 << 20
    assert system["state"] == {"allocator": "system", "why": "RESNETKIT_ALLOCATOR=system"}
    # glibc's defaults map and unmap each activation: 1.6 MB per 4 KiB page is ~400 faults
    # per tensor; tuned, the freed blocks are reused and no page is faulted in again
    assert system["faults"] > 1000
    assert tuned["faults"] < 50


def test_bad_allocator_choice_is_one_clear_error():
    r = subprocess.run([sys.executable, "-m", "resnetkit", "bench", "resnet20", "--batch", "2"],
                       env={**os.environ, "RESNETKIT_ALLOCATOR": "jemalloc"},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == ("resnetkit bench: error: RESNETKIT_ALLOCATOR must be tuned or "
                                "system, got 'jemalloc'")
