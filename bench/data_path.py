"""The data path before and after the uint8 store: loader img/s against the model's, and
training epochs' wall time, in one run.

    OMP_NUM_THREADS=2 python bench/data_path.py                      # the demo (mnist5k, 84 px) and a 224 px folder
    OMP_NUM_THREADS=2 python bench/data_path.py --sets folder --images 320

Per set, the same training images and the same LoRA ViT-S (the embedded model) at the
set's size, batch 32:
  - loader alone, one pass over the images: ``decode`` (every item decoded and resized,
    what every epoch did before) against ``store`` (first pass: decode once into the
    store; later passes: read from it);
  - the model alone: forward + backward + AdamW steps on batches already in memory;
  - two training epochs end to end (loader + model), each way.
The ``folder`` set is ``--images`` JPEG files of 480 x 360 px written once to a
temporary folder (MNIST-5k digits on a noisy background), read as an image-folder tree
at 224 px; ``demo`` is the embedded MNIST-5k at 84 px. Peak resident memory is printed.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from sls.backbones import create_backbone
from sls.bench import peak_rss_mb
from sls.data import ImageDataset, load_dataset, make_transform
from sls.data.files import read_files
from sls.data.store import forget_stores
from sls.petl import create_petl
from sls.train import train


def folder_set(root: Path, n_images: int) -> Path:
    """``n_images`` 480 x 360 JPEGs in 10 class folders (written once)."""
    digits = load_dataset("mnist5k")
    rng = np.random.default_rng(0)
    if len(list(root.rglob("*.jpg"))) == n_images:
        return root
    for i, j in enumerate(np.linspace(0, len(digits.labels) - 1, n_images).astype(int)):  # every class
        label = int(digits.labels[j])
        canvas = rng.integers(0, 60, size=(360, 480, 3), dtype=np.uint8)
        digit = np.asarray(Image.fromarray(digits.images[j]).resize((280, 280), Image.BICUBIC))
        canvas[40:320, 100:380] = np.maximum(canvas[40:320, 100:380], digit[..., None])
        (root / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(canvas).save(root / str(label) / f"{i}.jpg", quality=90)
    return root


def loader_pass(loader) -> float:
    start = time.perf_counter()
    for _ in loader:
        pass
    return time.perf_counter() - start


def model_rate(model, batch: torch.Tensor, labels: torch.Tensor, steps: int) -> float:
    """Training images per second on a batch already in memory."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    loss_fn = torch.nn.CrossEntropyLoss()
    for step in range(steps + 1):
        if step == 1:
            start = time.perf_counter()
        loss = loss_fn(model(batch), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return steps * len(batch) / (time.perf_counter() - start)


def measure(name: str, data, indices: np.ndarray, img_size: int, steps: int) -> None:
    model, info = create_backbone("embedded-dinov2-s", num_classes=len(data.classes), img_size=img_size)
    create_petl("lora").apply(model)
    transform = make_transform(img_size, info.mean, info.std, info.interpolation)
    n = len(indices)
    print(f"\n## {name}: {n} training images at {img_size} px, batch 32, {torch.get_num_threads()} threads")
    forget_stores()
    decoded = ImageDataset(data, indices, transform)
    stored = ImageDataset(data, indices, transform, store=True)
    t_decode = loader_pass(DataLoader(decoded, batch_size=32))
    t_first = loader_pass(DataLoader(stored, batch_size=32))
    t_stored = loader_pass(DataLoader(stored, batch_size=32))
    batch, labels = next(iter(DataLoader(stored, batch_size=32)))
    rate = model_rate(model, batch, labels, steps)
    print(f"loader alone, decode every item:   {n / t_decode:9.1f} img/s  ({t_decode:.2f} s a pass)")
    print(f"loader alone, store (first pass):  {n / t_first:9.1f} img/s  ({t_first:.2f} s: the one decode)")
    print(f"loader alone, store (later passes):{n / t_stored:9.1f} img/s  ({t_stored:.3f} s a pass)  ->  "
          f"{t_decode / t_stored:.0f}x the decoding loader")
    print(f"model alone (train step):          {rate:9.1f} img/s  ->  decoding loader / model = "
          f"{(n / t_decode) / rate:.2f}, store / model = {(n / t_stored) / rate:.1f}")
    epochs = {}
    for label, dataset in (("decode", decoded), ("store", stored)):
        loader = DataLoader(dataset, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
        times = []
        for _ in range(2):
            start = time.perf_counter()
            train(model, loader, epochs=1, lr=1e-4, progress=False)
            times.append(time.perf_counter() - start)
        epochs[label] = times
        print(f"training epoch, {label:6s}: {', '.join(f'{t:.1f} s' for t in times)}")
    print(f"epoch wall time, store / decode: {min(epochs['store']) / min(epochs['decode']):.3f} (fastest epochs)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", default="demo,folder", help="demo, folder or both")
    parser.add_argument("--images", type=int, default=320, help="training images per set (default: 320)")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps for the model alone")
    args = parser.parse_args()
    for name in args.sets.split(","):
        if name == "demo":
            data = load_dataset("mnist5k")
            spread = np.linspace(0, len(data.labels) - 1, args.images).astype(int)
            measure("demo (mnist5k)", data, spread, 84, args.steps)
        else:
            root = folder_set(Path(tempfile.gettempdir()) / f"sls-bench-folder-{args.images}", args.images)
            data = read_files(str(root))
            measure("224 px image folder (480 x 360 JPEGs)", data, np.arange(len(data)), 224, args.steps)
    print(f"\npeak resident memory: {peak_rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
