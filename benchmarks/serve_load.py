"""Load test of `resnetkit serve`: a bounded async load generator on 127.0.0.1.

Starts the server (or uses --url), then for each concurrency level (and each --protocol:
/predict, or the Open Inference Protocol's infer with binary tensors) sends a fixed number of
requests (stopping early at --duration seconds) from that many concurrent clients, and
reads the server's /metrics before and after for the mean batch size. Optionally: an
overload phase (open-loop arrivals at --overload x the measured throughput for
--overload-seconds, /health polled throughout, the server's memory sampled) and the
`resnetkit bench` throughput of the same model and engine at the mean batch size reached;
with --reload, a new version and then a broken one dropped into the model repository during
a load (serve_reload.py). Prints JSON.

    python benchmarks/serve_load.py runs/fm15 --concurrency 1 8 64 --requests 2000 --bench
    python benchmarks/serve_load.py resnet50-random.safetensors --requests 200 --images 224
    python benchmarks/serve_load.py runs/fm15 --protocol predict v2 --reload 20
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import multiprocessing
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import httpx
import numpy as np
import psutil
from PIL import Image
from serve_reload import make_repository, reload_phases


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_images(kind: str, n: int = 64) -> list[tuple[bytes, str]]:
    """Encoded request bodies: Fashion-MNIST test images as PNG ("fashion-mnist"), or
    random-pixel JPEGs of a side given as a number (e.g. "256" for a 224 model)."""
    out = []
    if kind == "fashion-mnist":
        from resnetkit.data import load_dataset
        ds = load_dataset("fashion-mnist", "test")
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(ds.images[i, 0].numpy()).save(buf, "PNG")
            out.append((buf.getvalue(), "image/png"))
        return out
    side, rng = int(kind), np.random.default_rng(0)
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, "JPEG")
        out.append((buf.getvalue(), "image/jpeg"))
    return out


def metric(text: str, name: str) -> float:
    """Sum of a metric's samples in Prometheus text (labels ignored)."""
    return sum(float(m.group(1)) for m in
               re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def pct(xs: list[float], q: float) -> float | None:
    return float(np.percentile(xs, q)) * 1e3 if xs else None


def v2_request(model: str, image: bytes) -> tuple[bytes, str]:
    """An Open Inference Protocol infer request as tritonclient sends it by default: the
    file as a BYTES input in binary (Triton's binary tensor data extension), the outputs
    asked in binary; (body, JSON header length)."""
    head = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                   "parameters": {"binary_data_size": len(image) + 4}}],
                       "parameters": {"binary_data_output": True}}).encode()
    return head + len(image).to_bytes(4, "little") + image, str(len(head))


def requests_for(bodies: list, protocol: str, model: str | None) -> list:
    """(path, body, headers) of each test image for /predict or the v2 infer route."""
    if protocol == "predict":
        return [("/predict", b, {"Content-Type": k}) for b, k in bodies]
    out = []
    for b, _ in bodies:
        body, n = v2_request(model, b)
        out.append((f"/v2/models/{model}/infer", body,
                    {"Content-Type": "application/octet-stream",
                     "Inference-Header-Content-Length": n}))
    return out


async def post(s, url: str, body, kind: str | None = None) -> str:
    """One request ((path, body, headers), or a /predict body and its type); its status
    code, or the name of the connection error."""
    path, body, headers = body if kind is None else ("/predict", body, {"Content-Type": kind})
    try:
        async with s.post(f"{url}{path}", data=body, headers=headers) as r:
            await r.read()
            return str(r.status)
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        return type(e).__name__


def cpu_seconds(server_pid: int | None) -> dict[str, float]:
    """CPU seconds (user + system) so far of this load generator ("client") and of the
    server's processes by role: "workers" (the spawned inference processes) and "http" (the
    rest: the HTTP process, the queue manager, and the supervisor, whose thread passes the
    workers' responses on to the HTTP process)."""
    me = psutil.Process().cpu_times()
    out = {"client": me.user + me.system, "workers": 0.0, "http": 0.0}
    if server_pid:
        try:
            root = psutil.Process(server_pid)
            tree = [root] + root.children(recursive=True)
        except psutil.Error:  # the server is gone: its figures stay 0
            return out
        for p in tree:
            try:
                t, cmd = p.cpu_times(), " ".join(p.cmdline())
            except psutil.Error:
                continue
            if "resource_tracker" not in cmd:
                out["workers" if "spawn_main" in cmd else "http"] += t.user + t.system
    return out


async def closed_loop(url: str, bodies: list, concurrency: int, requests: int,
                      duration: float, server_pid: int | None = None,
                      times: list | None = None) -> dict:
    """`concurrency` clients, each sending its next request ((path, body, headers) from
    `bodies`) when the last one is answered, until `requests` are sent or `duration` seconds
    pass. With the server's pid, also the CPU milliseconds per answered request of the
    client, the HTTP side and the workers; with `times`, (start, latency) of each answer
    is appended to it."""
    lat, codes, sent = [], {}, [0]
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency),
                                     timeout=timeout) as s:
        async with s.get(f"{url}/metrics") as r:
            before = await r.text()
        cpu0 = cpu_seconds(server_pid)
        t0 = time.perf_counter()

        async def client() -> None:
            while sent[0] < requests and time.perf_counter() - t0 < duration:
                request = bodies[sent[0] % len(bodies)]
                sent[0] += 1
                t = time.perf_counter()
                code = await post(s, url, request)
                codes[code] = codes.get(code, 0) + 1
                if code == "200":
                    lat.append(time.perf_counter() - t)
                    if times is not None:
                        times.append((t - t0, time.perf_counter() - t))
        await asyncio.gather(*(client() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
        cpu1 = cpu_seconds(server_pid)
        async with s.get(f"{url}/metrics") as r:
            after = await r.text()
    batches = metric(after, "resnetkit_batch_size_count") - metric(before, "resnetkit_batch_size_count")
    images = metric(after, "resnetkit_batch_size_sum") - metric(before, "resnetkit_batch_size_sum")
    return {"concurrency": concurrency, "requests": sum(codes.values()), "seconds": wall,
            "requests_per_s": len(lat) / wall, "p50_ms": pct(lat, 50), "p95_ms": pct(lat, 95),
            "p99_ms": pct(lat, 99), "mean_batch": images / batches if batches else None,
            "batches": int(batches), "codes": codes,
            "errors": sum(n for k, n in codes.items() if k != "200"),
            "cpu_ms_per_request": {k: (cpu1[k] - cpu0[k]) * 1e3 / len(lat) if lat else None
                                   for k in cpu0} if server_pid else None}


async def overload(url: str, bodies: list, rate: float, seconds: float, pid: int | None,
                   connections: int) -> dict:
    """Open-loop arrivals at `rate` requests/s for `seconds` over at most `connections`
    connections (beyond them requests wait in the client, as behind a proxy's pool);
    /health polled every 50 ms from a process of its own; the server's processes' memory
    (RSS) sampled. The server's own counts (/metrics) tell whether every request it
    accepted was answered: each accepted one is counted once it is answered."""
    codes, tasks = {}, []
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections),
                                     timeout=timeout) as s, \
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as hs:
        async with hs.get(f"{url}/metrics") as r:
            before = await r.text()

        async def one(i: int) -> None:
            code = await post(s, url, bodies[i % len(bodies)])
            codes[code] = codes.get(code, 0) + 1

        ctx = multiprocessing.get_context("spawn")
        done, out = ctx.Event(), ctx.Queue()
        poller = ctx.Process(target=poll_health, args=(url, pid, done, out))
        poller.start()
        await asyncio.sleep(2)  # polling before the flood starts
        t0, i = time.perf_counter(), 0
        while time.perf_counter() - t0 < seconds:
            tasks.append(asyncio.create_task(one(i)))
            i += 1
            await asyncio.sleep(max(0.0, t0 + i / rate - time.perf_counter()))
        await asyncio.gather(*tasks)
        done.set()
        health, rss = out.get(timeout=60)
        poller.join(10)
        async with hs.get(f"{url}/metrics") as r:
            after = await r.text()
    server = {code: metric(after, f'resnetkit_requests_total{{code="{code}"}}')
              - metric(before, f'resnetkit_requests_total{{code="{code}"}}') for code in ("200", "503")}
    h = [t for t, _ in health]
    third = max(1, len(rss) // 3)
    lost = sum(n for k, n in codes.items() if k not in ("200", "503"))
    return {"server_counted": server, "client_connections": connections, "rate": rate,
            "seconds": seconds, "sent": i, "sent_per_s": i / seconds, "codes": codes,
            "accepted": sum(n for k, n in codes.items() if k != "503"),
            "rejected_503": codes.get("503", 0), "accepted_lost": lost,
            "health_polls": len(h), "health_failures": sum(1 for _, ok in health if not ok),
            "health_max_ms": max(h) * 1e3 if h else None,
            "health_p99_ms": pct(h, 99),
            "rss_mb_first_third_max": max(rss[:third]) / 2**20 if rss else None,
            "rss_mb_last_third_max": max(rss[-third:]) / 2**20 if rss else None,
            "rss_mb_peak": max(rss) / 2**20 if rss else None}


def poll_health(url: str, pid: int | None, done, out) -> None:
    """In a process of its own, so the load generator's busy event loop does not delay it:
    GET /health every 50 ms on one keep-alive connection, (seconds, ok) each; the server's
    memory (RSS of all its processes) at each poll."""
    import http.client
    host, port = url.removeprefix("http://").split(":")
    conn, health, rss = http.client.HTTPConnection(host, int(port), timeout=5), [], []
    while not done.is_set():
        t = time.perf_counter()
        try:
            conn.request("GET", "/health")
            r = conn.getresponse()
            r.read()
            ok = r.status == 200
        except (OSError, http.client.HTTPException):
            conn.close()
            conn, ok = http.client.HTTPConnection(host, int(port), timeout=5), False
        health.append((time.perf_counter() - t, ok))
        if pid:
            procs = [psutil.Process(pid)] + psutil.Process(pid).children(recursive=True)
            rss.append(sum(p.memory_info().rss for p in procs if p.is_running()))
        time.sleep(0.05)
    out.put((health, rss))


def bench_at(model_info: dict, batch: int, rounds: int, threads: int) -> dict:
    """`resnetkit bench` of the served architecture at `batch` (its resnetkit_infer path is
    what the server's torch engine runs: optimize() without compiling)."""
    cmd = [sys.executable, "-m", "resnetkit", "bench", model_info["preset"], "--batch",
           str(batch), "--image-size", str(model_info["image_size"]), "--in-chans",
           str(model_info["in_chans"]), "--num-classes", str(model_info["num_classes"]),
           "--rounds", str(rounds), "--threads", str(threads), "--no-train", "--no-onnx",
           "--json"]
    out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    return {"command": " ".join(cmd[2:]), "batch": batch,
            **{k: {"img_s": v["img_s"], "precision": v.get("precision")}
               for k, v in out["results"].items()}}


def start_server(model: str | None, port: int, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "resnetkit", "serve", *([model] if model else []), "--port",
           str(port), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for _ in range(600):
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stderr.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("server not ready in 300 s")


def stop_server(proc: subprocess.Popen) -> dict:
    """SIGTERM, then: exit status, seconds to exit, processes of the server left alive."""
    tree = [proc.pid] + [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
    t = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(60)
    time.sleep(1)
    left = [p for p in tree if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
    return {"exit_code": code, "seconds": time.perf_counter() - t, "processes_left": len(left)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", help="what to serve (run folder, checkpoint, tag, .onnx)")
    p.add_argument("--url", help="an already running server instead of starting one")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--requests", type=int, default=1000, help="requests per level")
    p.add_argument("--duration", type=float, default=60, help="seconds per level at most")
    p.add_argument("--images", default="fashion-mnist",
                   help="fashion-mnist, or a side N for random NxN JPEGs")
    p.add_argument("--serve-args", default="", help="extra `resnetkit serve` options")
    p.add_argument("--overload", type=float, default=0,
                   help="then send this many times the top measured throughput, open loop")
    p.add_argument("--overload-seconds", type=float, default=30)
    p.add_argument("--overload-connections", type=int, default=512,
                   help="client connections at most during the overload")
    p.add_argument("--bench", action="store_true",
                   help="also run `resnetkit bench` at the mean batch size of the top level")
    p.add_argument("--bench-rounds", type=int, default=7)
    p.add_argument("--protocol", nargs="+", default=["predict"], choices=["predict", "v2"],
                   help="each level with /predict, and/or the Open Inference Protocol's infer "
                        "with binary tensors")
    p.add_argument("--reload", type=float, default=0, metavar="SECONDS",
                   help="serve MODEL from a model repository polled every second and, after "
                        "the levels, copy in a new version, then a broken one, each during "
                        "a load of SECONDS at the top concurrency")
    p.add_argument("--out", help="also write the JSON here")
    a = p.parse_args()
    if not a.url and not a.model:
        p.error("give MODEL or --url")
    proc, url, repo = None, a.url, None
    if not url:
        port = free_port()
        extra = a.serve_args.split()
        if a.reload:
            repo = make_repository(a.model, Path(tempfile.mkdtemp(prefix="serve-load-")))
            extra = ["--model-repository", str(repo.parent), "--poll-seconds", "1", *extra]
        proc = start_server(None if repo else a.model, port, extra)
        url = f"http://127.0.0.1:{port}"
    bodies = test_images(a.images)
    meta = httpx.get(f"{url}/metadata", timeout=10).json()
    requests = {pr: requests_for(bodies, pr, meta.get("name")) for pr in a.protocol}
    load = os.getloadavg()
    result = {"model": a.model or url, "engine": meta["engine"], "precision": meta["precision"],
              "limits": meta["limits"], "image_bytes_mean": statistics.mean(len(b) for b, _ in bodies),
              "cpu": _cpu_model(), "cores": os.cpu_count(),
              "loadavg_before": load, "levels": []}
    try:
        for c in a.concurrency:
            for protocol, reqs in requests.items():
                lvl = {"protocol": protocol, **asyncio.run(closed_loop(
                    url, reqs, c, a.requests, a.duration, proc.pid if proc else None))}
                result["levels"].append(lvl)
                print(json.dumps(lvl), file=sys.stderr, flush=True)
        top = max(result["levels"], key=lambda r: r["concurrency"])
        low = min(result["levels"], key=lambda r: r["concurrency"])
        if a.overload:
            rate = a.overload * max(r["requests_per_s"] for r in result["levels"])
            result["overload"] = asyncio.run(overload(url, next(iter(requests.values())),
                                                      rate, a.overload_seconds,
                                                      proc.pid if proc else None,
                                                      a.overload_connections))
        if repo is not None:
            result["reload"] = reload_phases(
                closed_loop, url, requests[a.protocol[-1]], a.model, repo,
                max(a.concurrency), a.reload, proc.pid if proc else None, 1.0)
        result["loadavg_after"] = os.getloadavg()
        c8 = [r for r in result["levels"] if r["concurrency"] == 8]
        if c8 and c8[0]["p50_ms"]:
            result["targets"] = {"p99_over_p50_at_8": c8[0]["p99_ms"] / c8[0]["p50_ms"]}
    finally:
        if proc:
            result["shutdown"] = stop_server(proc)
    if a.bench and meta.get("card") and top["mean_batch"]:  # back to back, server stopped
        add_bench(result, meta, top, low, a.bench_rounds)
    text = json.dumps(result, indent=2)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")


def add_bench(result: dict, meta: dict, top: dict, low: dict, rounds: int) -> None:
    """`resnetkit bench` at the top level's mean batch and at batch 1, and the ratios."""
    b = max(1, round(top["mean_batch"]))
    threads = meta["limits"]["threads_per_worker"]
    result["bench"] = {"at_mean_batch": bench_at(meta["card"], b, rounds, threads),
                       "at_batch_1": bench_at(meta["card"], 1, rounds, threads)}
    served = result["bench"]["at_mean_batch"]["resnetkit_infer"]["img_s"]
    single = result["bench"]["at_batch_1"]["resnetkit_infer"]["img_s"]
    result.setdefault("targets", {}).update({
        "c_top_over_bench": top["requests_per_s"] / served,
        "c_top_over_c_low": top["requests_per_s"] / low["requests_per_s"],
        # what batching can give at most: the model's own speed-up from batch 1
        "bench_batch_over_batch_1": served / single})
    cpu = top.get("cpu_ms_per_request") or {}
    if cpu.get("workers"):
        # the workers' CPU per request at the top level against the model's own time per
        # image: what the server costs where the worker is not short of a core
        result["targets"]["worker_cpu_over_bench_time"] = cpu["workers"] / (1e3 / served)


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    main()
