"""Load on ``sls serve``: requests/s, latency and resident memory for 1, 4 and 16 tasks on one
backbone, against the same tasks held as separate merged models, in one run.

    OMP_NUM_THREADS=2 python bench/serve_load.py --task TASK_DIR   # a pruned task (the demo's: embedded ViT-S)
    OMP_NUM_THREADS=2 python bench/serve_load.py                   # trains a quick one first (about 2 min)

The tasks are N copies of ``--task``, each loaded on its own (its own PETL tensors, head and
cut in memory), so the memory is what N distinct tasks of that method and k hold. For each
N, ``sls serve`` runs as a separate process on a free loopback port; ``--clients``
concurrent clients (one asyncio loop, raw HTTP/1.1 over kept-alive connections) send one-image PNG requests round-robin over
the tasks until ``--requests`` are answered or ``--seconds`` have passed, whichever comes
first. Reported: answered requests/s (= images/s), p50/p95/p99 latency, and the server's
resident memory after the load (VmRSS) and at its peak (VmHWM).

Against it, in one run:
- the same N tasks as separate merged models (``deployable_model(load_task(...))``, what a
  user of width pruning or of one model per task must hold), loaded in a child process with
  one forward pass each: its VmRSS and VmHWM;
- the same load with ``--per-task-batches`` (each pass one task's images only);
- in this process, ``--max-batch`` images spread over the tasks as one shared pass of
  their group against one pass per task (the model alone: no HTTP, no other thread);
- ``sls predict``'s batch throughput: ``load_task``'s model through ``sls.export.predict``
  on batches of ``--max-batch`` preprocessed images, in this process (no HTTP, no decoding).

The client runs on the same machine as the server: on a 2-core machine it takes cores the
server would use, so the serving figures are a floor; the CPU milliseconds per request of
the server and of the client are printed, to show how much.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _memory_mb(pid: int) -> dict:
    """VmRSS and VmHWM of a process, in MB (Linux)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = round(int(value.split()[0]) / 1024, 1)
    return fields


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def quick_task(folder: Path) -> Path:
    """A pruned LoRA task on the embedded ViT-S at the demo's 84 px, k = 8, trained briefly."""
    subprocess.run([sys.executable, "-m", "sls.cli", "run", "--model", "embedded-dinov2-s", "--data", "mnist5k",
                    "--petl", "lora", "--depth", "8", "--epochs", "1", "--train-samples", "500", "--test-samples",
                    "200", "--out", str(folder), "--quiet"], check=True)  # fmt: skip
    return folder


def png_images(count: int) -> list[bytes]:
    from sls.data import load_dataset

    data = load_dataset("mnist5k")
    out = []
    for i in range(count):
        buffer = io.BytesIO()
        data.image(i).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def request_bytes(port: int, name: str, image: bytes) -> bytes:
    """One multipart predict request, as the bytes on the wire (HTTP/1.1, kept alive)."""
    boundary = "slsbenchboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"images\"; filename=\"i.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + image + f"\r\n--{boundary}--\r\n".encode()  # fmt: skip
    head = (f"POST /v1/tasks/{name}/predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n")  # fmt: skip
    return head.encode() + body


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> int:
    """Send one request on a kept-alive connection; read the whole answer; its status."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    length = next(int(line.split(":", 1)[1]) for line in lines if line.lower().startswith("content-length:"))
    await reader.readexactly(length)
    return int(lines[0].split()[1])


async def load(port: int, names: list[str], images: list[bytes], *, clients: int, requests: int,
               seconds: float) -> dict:  # fmt: skip
    """``clients`` concurrent request loops until ``requests`` answers or ``seconds``. The client
    is raw asyncio streams over prebuilt requests (a few tenths of a millisecond of CPU per
    request), so it takes as little as it can of the cores the server runs on."""
    wire = {(name, i): request_bytes(port, name, image) for name in names for i, image in enumerate(images)}
    latencies, failures, sent = [], 0, 0
    deadline = time.monotonic() + seconds

    async def client(warm_up: bool = False) -> None:
        nonlocal failures, sent
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            if warm_up:  # every task's first batch, untimed
                for name in names:
                    await exchange(reader, writer, wire[name, 0])
                return
            while sent < requests and time.monotonic() < deadline:
                i = sent
                sent += 1
                began = time.perf_counter()
                status = await exchange(reader, writer, wire[names[i % len(names)], i % len(images)])
                if status == 200:
                    latencies.append(time.perf_counter() - began)
                else:
                    failures += 1
        finally:
            writer.close()

    await client(warm_up=True)
    began = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    wall = time.perf_counter() - began
    ms = np.asarray(latencies) * 1000
    return {"answered": len(latencies), "failed": failures, "seconds": round(wall, 2),
            "requests_per_s": round(len(latencies) / wall, 1),
            **{f"p{q}_ms": round(float(np.percentile(ms, q)), 1) for q in (50, 95, 99)}}  # fmt: skip


def serve_and_load(folders: list[Path], images: list[bytes], args, *options: str) -> dict:
    import httpx

    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "sls.cli", "serve", *map(str, folders), "--port", str(port),
                               "--log-level", "warning", "--max-batch", str(args.max_batch), "--max-wait-ms",
                               str(args.max_wait_ms), *options], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            if server.poll() is not None:
                raise SystemExit(f"the server exited: {server.stderr.read().decode()}")
            try:
                httpx.get(f"{url}/healthz", timeout=5)
                break
            except httpx.TransportError:
                time.sleep(0.3)
        loaded = _memory_mb(server.pid)
        names = [folder.name for folder in folders]
        server_cpu, client_cpu = _cpu_seconds(server.pid), _cpu_seconds(os.getpid())
        figures = asyncio.run(load(port, names, images, clients=args.clients, requests=args.requests,
                                   seconds=args.seconds))  # fmt: skip
        answered = max(figures["answered"] + len(names), 1)  # the warm-up's requests too
        figures["server_cpu_ms_per_request"] = round(1000 * (_cpu_seconds(server.pid) - server_cpu) / answered, 1)
        figures["client_cpu_ms_per_request"] = round(1000 * (_cpu_seconds(os.getpid()) - client_cpu) / answered, 1)
        metrics = httpx.get(f"{url}/metrics", timeout=30).text
        figures |= {
            "rss_loaded_mb": loaded["VmRSS"],
            **{f"{k.lower()}_mb": v for k, v in _memory_mb(server.pid).items()},
        }
        value = {
            line.split()[0]: float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("sls_pass_")
        }
        passes, images, busy = (
            value["sls_pass_images_count"],
            value["sls_pass_images_sum"],
            value["sls_pass_seconds_sum"],
        )
        figures["mean_batch"] = round(images / max(passes, 1), 1)
        figures["forward_img_per_s"] = round(images / max(busy, 1e-9), 1)  # while the model ran
        figures["model_busy"] = round(busy / figures["seconds"], 2)  # warm-up included: about
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    return figures


SEPARATE = """
import json, sys, torch
from pathlib import Path
from sls.experiment import load_task
from sls.petl.merge import deployable_model
models = [deployable_model(load_task(folder)[0]) for folder in sys.argv[2:]]
size = int(sys.argv[1])
with torch.inference_mode():
    for model in models:
        model(torch.zeros(1, 3, size, size))
fields = {}
for line in Path("/proc/self/status").read_text().splitlines():
    key, _, value = line.partition(":")
    if key in ("VmRSS", "VmHWM"):
        fields[key.lower() + "_mb"] = round(int(value.split()[0]) / 1024, 1)
print(json.dumps(fields))
"""


def separate_models(folders: list[Path], img_size: int) -> dict:
    out = subprocess.run([sys.executable, "-c", SEPARATE, str(img_size), *map(str, folders)], check=True,
                         capture_output=True, text=True)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def predict_throughput(folder: Path, images: list[bytes], batch: int) -> float:
    """Images/s of ``sls predict``'s batch path on preprocessed images (no HTTP, no decoding)."""
    import torch
    from PIL import Image

    from sls.data import make_transform
    from sls.experiment import load_task
    from sls.export import predict

    model, record = load_task(folder)
    backbone = record.backbone
    transform = make_transform(backbone["img_size"], tuple(backbone["mean"]), tuple(backbone["std"]),
                               backbone.get("interpolation", "bicubic"))  # fmt: skip
    batch_images = torch.stack([transform(Image.open(io.BytesIO(images[i % len(images)])).convert("RGB"))
                                for i in range(batch)])  # fmt: skip

    predict(model, batch_images)  # warm-up
    calls, began = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - began < 5:
        predict(model, batch_images)
        calls += 1
    return calls * batch / (time.perf_counter() - began)


def shared_passes(folders: list[Path], images: list[bytes], batch: int, rounds: int = 5) -> dict:
    """In this process, no HTTP: ``batch`` images spread round-robin over the tasks, as one
    pass of their group (:class:`sls.serve.mux.MuxGroup`) against one pass per task. Both in
    turns, ``rounds`` times; the median ms of each."""
    import torch
    from PIL import Image

    from sls.serve import TaskPool

    pool = TaskPool()
    for folder in folders:
        pool.add(folder)
    names = [folder.name for folder in folders]
    group, _ = pool.placement[names[0]]
    transform = pool.tasks[names[0]].transform
    x = torch.stack([transform(Image.open(io.BytesIO(images[i % len(images)])).convert("RGB")) for i in range(batch)])
    owners = [i % len(names) for i in range(batch)]

    def per_task() -> None:
        for member, name in enumerate(names):
            rows = [i for i, owner in enumerate(owners) if owner == member]
            if rows:
                pool.forward(name, x[rows])

    timings: dict[str, list[float]] = {"one shared pass": [], "a pass per task": []}
    for fn in (lambda: group.forward(x, owners), per_task):  # warm-up
        fn()
    for _ in range(rounds):
        for label, fn in (("one shared pass", lambda: group.forward(x, owners)), ("a pass per task", per_task)):
            began = time.perf_counter()
            fn()
            timings[label].append(1000 * (time.perf_counter() - began))
    return {label: round(float(np.median(values)), 1) for label, values in timings.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default=None, help="a pruned task folder (default: train a quick one)")
    parser.add_argument("--tasks", default="1,4,16", help="numbers of tasks served (default: %(default)s)")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients (default: %(default)s)")
    parser.add_argument("--requests", type=int, default=400, help="requests per load (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=60, help="the longest load (default: %(default)s)")
    parser.add_argument("--max-batch", type=int, default=16, help="the server's --max-batch (default: %(default)s)")
    parser.add_argument(
        "--max-wait-ms", type=float, default=5, help="the server's --max-wait-ms (default: %(default)s)"
    )
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()

    counts = [int(n) for n in args.tasks.split(",")]
    with tempfile.TemporaryDirectory(prefix="sls-serve-load-") as scratch:
        scratch = Path(scratch)
        source = Path(args.task) if args.task else quick_task(scratch / "source")
        record = json.loads((source / "record.json").read_text())
        img_size = int(record["backbone"]["img_size"])
        folders = []
        for i in range(max(counts)):
            folders.append(scratch / f"task{i:02d}")
            shutil.copytree(source, folders[-1])
        images = png_images(64)
        print(f"{record['backbone']['model']} at {img_size} px, {record['config']['petl']}, k = {record['depth']} of "
              f"{record['backbone']['num_blocks']}; {args.clients} clients, {args.requests} one-image requests per load, "
              f"server --max-batch {args.max_batch} --max-wait-ms {args.max_wait_ms:g}; "
              f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")  # fmt: skip
        reference = predict_throughput(source, images, args.max_batch)
        print(f"sls predict's batch path (batch {args.max_batch}, in process): {reference:.1f} img/s")
        rows = []
        for n in counts:
            served = serve_and_load(folders[:n], images, args)
            apart = serve_and_load(folders[:n], images, args, "--per-task-batches") if n > 1 else None
            separate = separate_models(folders[:n], img_size)
            rows.append({"tasks": n, "served": served, "per_task_batches": apart, "separate": separate})
            print(f"{n:>2} task(s): {served['requests_per_s']:.1f} req/s ({served['requests_per_s'] / reference:.2f}x "
                  f"sls predict), p50 {served['p50_ms']:.0f} / p95 {served['p95_ms']:.0f} / p99 {served['p99_ms']:.0f} "
                  f"ms, mean batch {served['mean_batch']}, forward {served['forward_img_per_s']:.0f} img/s, model busy "
                  f"{100 * served['model_busy']:.0f}% of the time, {served['failed']} failed; CPU ms per request: server "
                  f"{served['server_cpu_ms_per_request']}, client {served['client_cpu_ms_per_request']}; server RSS "
                  f"{served['vmrss_mb']:.0f} MB (peak {served['vmhwm_mb']:.0f}); separate merged models "
                  f"{separate['vmrss_mb']:.0f} MB (peak {separate['vmhwm_mb']:.0f})", flush=True)  # fmt: skip
            if apart is not None:
                print(f"   batched per task (--per-task-batches): {apart['requests_per_s']:.1f} req/s "
                      f"({apart['requests_per_s'] / reference:.2f}x), p50 {apart['p50_ms']:.0f} / p99 "
                      f"{apart['p99_ms']:.0f} ms, mean batch {apart['mean_batch']}", flush=True)  # fmt: skip
        passes = {n: shared_passes(folders[:n], images, args.max_batch) for n in counts if n > 1}
        for n, timing in passes.items():
            print(f"{args.max_batch} images over {n} tasks, in process: one shared pass {timing['one shared pass']:.0f} ms, "
                  f"a pass per task {timing['a pass per task']:.0f} ms "
                  f"({timing['a pass per task'] / timing['one shared pass']:.2f}x)", flush=True)  # fmt: skip
        one = rows[0]["served"]["vmrss_mb"]
        for row in rows[1:]:
            print(f"{row['tasks']} tasks served / 1: {row['served']['vmrss_mb'] / one:.2f}x the memory "
                  f"(goal <= 1.25x); as separate merged models: "
                  f"{row['separate']['vmrss_mb'] / rows[0]['separate']['vmrss_mb']:.2f}x")  # fmt: skip
        if args.json:
            Path(args.json).write_text(
                json.dumps({"predict_img_per_s": reference, "rows": rows, "passes": passes}, indent=1)
            )


if __name__ == "__main__":
    main()
