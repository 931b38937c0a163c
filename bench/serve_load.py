"""Load on ``sls serve``: requests/s, latency and resident memory for 1, 4 and 16 tasks on one
backbone, against the same tasks held as separate merged models, in one run.

    OMP_NUM_THREADS=2 python bench/serve_load.py --task TASK_DIR   # a pruned task (the demo's: embedded ViT-S)
    OMP_NUM_THREADS=2 python bench/serve_load.py                   # trains a quick one first (about 2 min)

The tasks are N copies of ``--task``, each loaded on its own (its own PETL tensors, head and
cut in memory), so the memory is what N distinct tasks of that method and k hold. For each
N, ``sls serve`` runs as a separate process on a free loopback port; ``--clients``
concurrent clients (one asyncio loop, httpx) send one-image PNG requests round-robin over
the tasks until ``--requests`` are answered or ``--seconds`` have passed, whichever comes
first. Reported: answered requests/s (= images/s), p50/p95/p99 latency, and the server's
resident memory after the load (VmRSS) and at its peak (VmHWM).

Against it, in one run:
- the same N tasks as separate merged models (``deployable_model(load_task(...))``, what a
  user of width pruning or of one model per task must hold), loaded in a child process with
  one forward pass each: its VmRSS and VmHWM;
- ``sls predict``'s batch throughput: ``load_task``'s model through ``sls.export.predict``
  on batches of ``--max-batch`` preprocessed images, in this process (no HTTP, no decoding).

The client runs on the same machine as the server: on a 2-core machine it takes cores the
server would use, so the serving figures are a floor.
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


async def load(url: str, names: list[str], images: list[bytes], *, clients: int, requests: int, seconds: float) -> dict:
    """``clients`` concurrent request loops until ``requests`` answers or ``seconds``."""
    import httpx

    latencies, failures, sent = [], 0, 0
    deadline = time.monotonic() + seconds

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal failures, sent
        while sent < requests and time.monotonic() < deadline:
            i = sent
            sent += 1
            name, image = names[i % len(names)], images[i % len(images)]
            began = time.perf_counter()
            answer = await http.post(f"/v1/tasks/{name}/predict", files={"images": ("i.png", image, "image/png")})
            if answer.status_code == 200:
                latencies.append(time.perf_counter() - began)
            else:
                failures += 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        for name in names:  # warm-up: every task's first batch
            await http.post(f"/v1/tasks/{name}/predict", files={"images": ("i.png", images[0], "image/png")})
        began = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - began
    ms = np.asarray(latencies) * 1000
    return {"answered": len(latencies), "failed": failures, "seconds": round(wall, 2),
            "requests_per_s": round(len(latencies) / wall, 1),
            **{f"p{q}_ms": round(float(np.percentile(ms, q)), 1) for q in (50, 95, 99)}}  # fmt: skip


def serve_and_load(folders: list[Path], images: list[bytes], args) -> dict:
    import httpx

    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "sls.cli", "serve", *map(str, folders), "--port", str(port),
                               "--log-level", "warning", "--max-batch", str(args.max_batch), "--max-wait-ms",
                               str(args.max_wait_ms)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
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
        figures = asyncio.run(load(url, names, images, clients=args.clients, requests=args.requests,
                                   seconds=args.seconds))  # fmt: skip
        metrics = httpx.get(f"{url}/metrics", timeout=30).text
        figures |= {
            "rss_loaded_mb": loaded["VmRSS"],
            **{f"{k.lower()}_mb": v for k, v in _memory_mb(server.pid).items()},
        }
        counts = [float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("sls_batch_images_count")]
        sums = [float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("sls_batch_images_sum")]
        figures["mean_batch"] = round(sum(sums) / max(sum(counts), 1), 1)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default=None, help="a pruned task folder (default: train a quick one)")
    parser.add_argument("--tasks", default="1,4,16", help="numbers of tasks served (default: %(default)s)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (default: %(default)s)")
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
            separate = separate_models(folders[:n], img_size)
            rows.append({"tasks": n, "served": served, "separate": separate})
            print(f"{n:>2} task(s): {served['requests_per_s']:.1f} req/s ({served['requests_per_s'] / reference:.2f}x "
                  f"sls predict), p50 {served['p50_ms']:.0f} / p95 {served['p95_ms']:.0f} / p99 {served['p99_ms']:.0f} "
                  f"ms, mean batch {served['mean_batch']}, {served['failed']} failed; server RSS "
                  f"{served['vmrss_mb']:.0f} MB (peak {served['vmhwm_mb']:.0f}); separate merged models "
                  f"{separate['vmrss_mb']:.0f} MB (peak {separate['vmhwm_mb']:.0f})", flush=True)  # fmt: skip
        one = rows[0]["served"]["vmrss_mb"]
        for row in rows[1:]:
            print(f"{row['tasks']} tasks served / 1: {row['served']['vmrss_mb'] / one:.2f}x the memory "
                  f"(goal <= 1.25x); as separate merged models: "
                  f"{row['separate']['vmrss_mb'] / rows[0]['separate']['vmrss_mb']:.2f}x")  # fmt: skip
        if args.json:
            Path(args.json).write_text(json.dumps({"predict_img_per_s": reference, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
