"""The allocator setting: large blocks from the heap and kept there, so that repeated
forward passes fault in no new pages.
Each case runs in a fresh interpreter, since the setting is process-wide."""
import json
import os
import subprocess
import sys

import pytest

from resnetkit.runtime import _libc

PROBE = """
import ctypes, json, resource, torch, resnetkit
state = resnetkit.tune_allocator()
torch.set_num_threads(1)

class MallInfo2(ctypes.Structure):  # glibc >= 2.33
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                               "usmblks", "fsmblks", "uordblks", "fordblks",
                                               "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2

# a 30 MB block: mmapped (and unmapped on free) by default; from the heap, and kept, if tuned
before = libc.mallinfo2()
t = torch.empty(30 << 20, dtype=torch.uint8)
during = libc.mallinfo2()
del t
after = libc.mallinfo2()
block = {"mmapped": during.hblkhd - before.hblkhd, "free_in_heap_after": after.fordblks}

m = resnetkit.create_model("resnet18").eval()
x = torch.randn(4, 3, 160, 160)  # activations of 1.6 to 6.5 MB
with torch.inference_mode():
    m(x); m(x)
    a = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        m(x)
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - a) / 3
print(json.dumps({"state": state, "block": block, "faults": faults}))
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
    # glibc's defaults serve a 30 MB block with its own mmap and unmap it when freed; tuned,
    # it comes from the heap and stays there, free, for the next one
    assert system["block"]["mmapped"] >= 30 << 20
    assert tuned["block"]["mmapped"] == 0
    assert tuned["block"]["free_in_heap_after"] >= 30 << 20
    # a warm network's forward passes then fault in (next to) no new page: one pass of this
    # one writes ~100 MB of activations, 25,000 pages if every one were fresh
    assert tuned["faults"] < 200


def test_bad_allocator_choice_is_one_clear_error():
    r = subprocess.run([sys.executable, "-m", "resnetkit", "bench", "resnet20", "--batch", "2"],
                       env={**os.environ, "RESNETKIT_ALLOCATOR": "jemalloc"},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == ("resnetkit bench: error: RESNETKIT_ALLOCATOR must be tuned or "
                                "system, got 'jemalloc'")
