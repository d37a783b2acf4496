"""The allocator setting: large blocks from the heap and kept there, so that repeated
forward passes fault in no new pages.
Each case runs in a fresh interpreter, since the setting is process-wide."""
import json
import os
import subprocess
import sys

import pytest
import torch

from resnetkit.runtime.allocator import _libc

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
    per_pass = []
    for _ in range(5):
        a = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        m(x)
        per_pass.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - a)
# the median pass: a burst of the kernel's own (page migration or compaction while other
# processes run) lands in one pass, an allocator that hands back its pages faults in every one
faults = sorted(per_pass)[len(per_pass) // 2]
print(json.dumps({"state": state, "block": block, "faults": faults, "per_pass": per_pass}))
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
    assert tuned["faults"] < 200, tuned["per_pass"]


def test_bad_allocator_choice_is_one_clear_error():
    r = subprocess.run([sys.executable, "-m", "resnetkit", "bench", "resnet20", "--batch", "2"],
                       env={**os.environ, "RESNETKIT_ALLOCATOR": "jemalloc"},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == ("resnetkit bench: error: RESNETKIT_ALLOCATOR must be tuned or "
                                "system, got 'jemalloc'")


# ---- the peak: FLOP per cycle from the flags, the clock from cpufreq or a measured GEMM ------

@pytest.mark.parametrize("vendor,family,flags,want", [
    # Intel Sapphire Rapids: 2 x 512-bit FMA units (2 x 16 x 2), AMX 1024 bf16 / 2048 int8
    ("GenuineIntel", 6, {"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16",
                         "amx_int8"}, (64, 1024, 2048)),
    # AMD Zen 4: AVX-512 on 256-bit units (2 x 8 x 2), bf16 dot products twice that, VNNI 4x
    ("AuthenticAMD", 25, {"avx2", "avx512f", "avx512_bf16", "avx512_vnni"}, (32, 64, 128)),
    # AMD Zen 3: AVX2 only, int8 without VNNI about twice fp32
    ("AuthenticAMD", 25, {"avx2", "fma"}, (32, 32, 64)),
])
def test_flop_per_cycle_by_hand(vendor, family, flags, want):
    from resnetkit.runtime import _flop_per_cycle
    got = _flop_per_cycle({"vendor": vendor, "family": family, "flags": flags})
    assert (got["fp32"], got["bf16"], got["int8"]) == want


def test_peak_uses_cpufreq_max_where_the_os_reports_it(monkeypatch, tmp_path):
    from resnetkit import runtime
    (tmp_path / "cpuinfo_max_freq").write_text("3700000\n")  # kHz
    monkeypatch.setattr(runtime, "CPUFREQ", tmp_path)
    hw = runtime.hardware(measure=True)
    per = hw["flop_per_cycle"]["fp32"]
    assert hw["peak_source"] == "cpufreq cpuinfo_max_freq" and hw["ghz"] == 3.7
    assert hw["peak_fp32_gflops"] == pytest.approx(torch.get_num_threads() * per * 3.7)
    assert "gemm_fp32_gflops" not in hw


def test_peak_without_cpufreq_falls_back_to_a_measured_gemm(monkeypatch, tmp_path):
    # no C compiler: no multiply-add measurement; the GEMM counts where it beats the clock
    from resnetkit import runtime
    monkeypatch.setattr(runtime, "CPUFREQ", tmp_path / "absent")
    monkeypatch.setattr(runtime, "multiply_add_peaks", lambda t: {})
    base = runtime.cpu_info()["mhz"] / 1000
    threads = torch.get_num_threads()
    per = runtime._flop_per_cycle(runtime.cpu_info())
    fast = threads * per["fp32"] * (base + 1.0)  # a GEMM that implies a clock 1 GHz above
    monkeypatch.setattr(runtime, "gemm_gflops", lambda t: fast)
    hw = runtime.hardware(measure=True)
    assert hw["peak_source"].startswith("measured fp32 GEMM")
    assert hw["peak_fp32_gflops"] == pytest.approx(fast) and hw["ghz"] == pytest.approx(base + 1)
    assert hw["peak_int8_gops"] == pytest.approx(fast * per["int8"] / per["fp32"])
    monkeypatch.setattr(runtime, "gemm_gflops", lambda t: 1.0)  # slower: the stated clock
    hw = runtime.hardware(measure=True)
    assert hw["peak_source"] == "/proc/cpuinfo clock" and hw["ghz"] == pytest.approx(base)


def test_peak_without_cpufreq_takes_the_measured_multiply_add_rates(monkeypatch, tmp_path):
    from resnetkit import runtime
    monkeypatch.setattr(runtime, "CPUFREQ", tmp_path / "absent")
    base = runtime.cpu_info()["mhz"] / 1000
    threads = torch.get_num_threads()
    per = runtime._flop_per_cycle(runtime.cpu_info())
    fp32 = threads * per["fp32"] * (base + 1.0)
    monkeypatch.setattr(runtime, "gemm_gflops", lambda t: fp32 * 0.8)
    # a bf16 rate above the table's ratio counts as measured; int8 absent: the ratio
    monkeypatch.setattr(runtime, "multiply_add_peaks",
                        lambda t: {"fp32": fp32, "bf16": fp32 * per["bf16"] / per["fp32"] * 1.1})
    hw = runtime.hardware(measure=True)
    assert hw["peak_source_by_precision"] == {
        "fp32": "measured instruction rate", "bf16": "measured instruction rate",
        "int8": "measured fp32 rate x the table's ratio"}
    assert hw["peak_source"].startswith("measured multiply-add")
    assert hw["peak_fp32_gflops"] == pytest.approx(fp32) and hw["ghz"] == pytest.approx(base + 1)
    assert hw["peak_bf16_gflops"] == pytest.approx(fp32 * per["bf16"] / per["fp32"] * 1.1)
    assert hw["peak_int8_gops"] == pytest.approx(fp32 * per["int8"] / per["fp32"])


def test_measured_multiply_add_rates_match_the_instruction_tables():
    # an independent check of _flop_per_cycle's ratios (the vendors' instruction tables):
    # the measured dot-product rates against the measured FMA rate on this CPU, and no
    # GEMM faster than the FMA chains
    from resnetkit import runtime
    threads = torch.get_num_threads()
    rates = runtime.multiply_add_peaks(threads)
    if not rates:
        pytest.skip("no C compiler: the multiply-add rates are not measured here")
    per = runtime._flop_per_cycle(runtime.cpu_info())
    flags = runtime.cpu_flags()
    assert set(rates) == {"fp32"} | ({"bf16"} if "avx512_bf16" in flags else set()) | (
        {"int8"} if {"avx512_vnni", "avx_vnni"} & flags else set())
    # best of five rounds each, taken moments apart: generous bounds for a busy machine,
    # still far from the wrong table entries (a factor of 2)
    # Where the CPU has AMX, the table's bf16 and int8 figures are the tiles' rates, which
    # peak.c does not measure (it times AVX-512 dot products): nothing to compare them with.
    amx = {"bf16": "amx_bf16", "int8": "amx_int8"}
    for p in set(rates) - {"fp32"} - {k for k, f in amx.items() if f in flags}:
        assert rates[p] / rates["fp32"] == pytest.approx(per[p] / per["fp32"], rel=0.35)
    assert runtime.gemm_gflops(threads) <= rates["fp32"] * 1.25


def test_onednn_isa_cap_hides_the_instructions_above_it():
    # capped at AVX2, every AVX-512 and VNNI flag is hidden and peak.c is built without them
    code = ("from resnetkit import runtime; f = runtime.cpu_flags(); "
            "assert not [x for x in f if x.startswith(('avx512', 'amx', 'avx_vnni'))], f; "
            "r = runtime.multiply_add_peaks(1, 0.01, 1); "
            "assert set(r) <= {'fp32'}, r; print('ok')")
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_peak_kernels_need_a_compiler(monkeypatch, tmp_path):
    from resnetkit import runtime
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    assert runtime._peak_kernels() is None


def test_measured_gemm_is_below_the_peak():
    from resnetkit.runtime import gemm_gflops, hardware
    hw = hardware(measure=True)
    assert 0 < gemm_gflops(torch.get_num_threads()) <= hw["peak_fp32_gflops"] * 1.0001
