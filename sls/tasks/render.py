"""Pictures and files of dense predictions: overlays, ``predictions.png``, and what
``sls predict`` writes (a mask PNG or a boxes JSON per image, and an overlay)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.nn import functional as F

from sls._io import atomic_write

ALPHA = 0.5


def palette(n: int) -> np.ndarray:
    """``(n, 3)`` uint8 colours, class 0 (background, where a set has one) black."""
    from matplotlib import colormaps

    colours = (np.asarray(colormaps["tab20"](np.arange(max(n, 1)) % 20))[:, :3] * 255).astype(np.uint8)
    colours[0] = 0
    return colours


def overlay_mask(image: Image.Image, mask: np.ndarray, n_classes: int) -> Image.Image:
    """The image with each labelled pixel tinted by its class (class 0 and ignored pixels untouched)."""
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    colours = palette(n_classes)
    tinted = base.copy()
    labelled = (mask > 0) & (mask < n_classes)
    tinted[labelled] = (1 - ALPHA) * base[labelled] + ALPHA * colours[mask[labelled]]
    return Image.fromarray(tinted.astype(np.uint8))


def overlay_boxes(image: Image.Image, boxes: np.ndarray, labels: np.ndarray, classes: list[str],
                  scores: np.ndarray | None = None) -> Image.Image:  # fmt: skip
    """The image with each box outlined in its class's colour and captioned."""
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    colours = palette(len(classes) + 1)[1:]
    for i, (box, label) in enumerate(zip(np.asarray(boxes).reshape(-1, 4), labels)):
        colour = tuple(int(c) for c in colours[int(label) % len(colours)])
        draw.rectangle([float(v) for v in box], outline=colour, width=2)
        caption = classes[int(label)] + ("" if scores is None else f" {float(scores[i]):.2f}")
        draw.text((float(box[0]) + 2, float(box[1]) + 1), caption, fill=colour)
    return out


def _save_png(path: Path, image: Image.Image) -> None:
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def mask_of(logits: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """One image's ``(classes, h, w)`` segmentation logits as the ``(height, width)`` uint8
    class of every pixel at the image's own ``size`` (width, height)."""
    width, height = size
    up = F.interpolate(logits[None].float(), size=(height, width), mode="bilinear", align_corners=False)
    return up.argmax(dim=1)[0].cpu().numpy().astype(np.uint8)


def boxes_of(found: dict, size: tuple[int, int], img_size: int, threshold: float) -> tuple[np.ndarray, ...]:
    """One image's detections (torchvision's ``boxes``/``labels``/``scores`` at the model's
    input side ``img_size``) with a score of at least ``threshold``, as ``(boxes, labels,
    scores)`` arrays, the boxes in the pixels of the image's own ``size`` (width, height)."""
    width, height = size
    keep = found["scores"] >= threshold
    scale = torch.tensor([width / img_size, height / img_size] * 2)
    boxes = (found["boxes"][keep].float().cpu() * scale).numpy()
    return boxes, found["labels"][keep].cpu().numpy(), found["scores"][keep].float().cpu().numpy()


def box_entries(boxes: np.ndarray, labels: np.ndarray, scores: np.ndarray, classes: list[str]) -> list[dict]:
    """The JSON of :func:`boxes_of`'s arrays: one ``{box, label, class, score}`` per box."""
    return [{"box": [round(float(v), 2) for v in box], "label": int(lab), "class": classes[int(lab)],
             "score": round(float(s), 4)} for box, lab, s in zip(boxes, labels, scores)]  # fmt: skip


def present_classes(mask: np.ndarray, classes: list[str]) -> list[str]:
    """The classes a mask shows (class 0 left out where it is the background)."""
    return [classes[c] for c in np.unique(mask) if c > 0 or classes[0] != "background"]


@torch.inference_mode()
def predict_dense(task, model: torch.nn.Module, image: Image.Image, transform, img_size: int, classes: list[str],
                  out: Path, stem: str, *, threshold: float = 0.3) -> str:  # fmt: skip
    """Write one image's prediction into ``out``: ``<stem>.png`` (the class of every pixel,
    at the image's own size) or ``<stem>.json`` (boxes in the image's pixels, scores of
    at least ``threshold``), and ``<stem>.overlay.png``. Returns a one-line summary."""
    device = next(model.parameters()).device
    batch = transform(image)[None].to(device)
    model.eval()
    if task.name == "segmentation":
        mask = mask_of(model(batch)[0], image.size)
        _save_png(out / f"{stem}.png", Image.fromarray(mask))
        _save_png(out / f"{stem}.overlay.png", overlay_mask(image, mask, len(classes)))
        return f"{stem}.png: {', '.join(present_classes(mask, classes)) or 'background only'}"
    boxes, labels, scores = boxes_of(model(batch)[0], image.size, img_size, threshold)
    width, height = image.size
    entry = {"image": stem, "width": width, "height": height, "boxes": box_entries(boxes, labels, scores, classes)}
    atomic_write(out / f"{stem}.json", lambda tmp: tmp.write_text(json.dumps(entry, indent=1)))
    _save_png(out / f"{stem}.overlay.png", overlay_boxes(image, boxes, labels, classes, scores))
    return f"{stem}.json: {len(boxes)} box(es) at score >= {threshold:g}"


@torch.inference_mode()
def plot_predictions(path: Path, task, model: torch.nn.Module, dataset, classes: list[str], *, count: int = 4,
                     threshold: float = 0.3) -> Path:  # fmt: skip
    """``predictions.png``: the first ``count`` images of ``dataset``, ground truth above
    and the model's prediction below."""
    from sls.report import _pyplot

    count = min(count, len(dataset))
    device = next(model.parameters()).device
    fig, axes = _pyplot().subplots(2, count, figsize=(2.2 * count, 4.6), dpi=110, squeeze=False)
    model.eval()
    for column in range(count):
        index = int(dataset.indices[column])
        image = dataset.data.image(index).resize((dataset.img_size, dataset.img_size))
        pixels, target = dataset[column]
        out = model(pixels[None].to(device))
        if task.name == "segmentation":
            truth = overlay_mask(image, target.numpy(), len(classes))
            guess = overlay_mask(image, out.argmax(1)[0].cpu().numpy(), len(classes))
        else:
            found = out[0]
            keep = found["scores"] >= threshold
            truth = overlay_boxes(image, target["boxes"].numpy(), target["labels"].numpy(), classes)
            guess = overlay_boxes(image, found["boxes"][keep].cpu().numpy(), found["labels"][keep].cpu().numpy(),
                                  classes, found["scores"][keep].cpu().numpy())  # fmt: skip
        for row, picture in enumerate((truth, guess)):
            axes[row, column].imshow(picture)
            axes[row, column].axis("off")
        axes[0, column].set_title(dataset.data.item_name(index).split("/")[-1][:24], fontsize=7)
    axes[0, 0].text(-0.08, 0.5, "ground truth", rotation=90, va="center", ha="right", transform=axes[0, 0].transAxes,
                    fontsize=8)  # fmt: skip
    axes[1, 0].text(-0.08, 0.5, "prediction", rotation=90, va="center", ha="right", transform=axes[1, 0].transAxes,
                    fontsize=8)  # fmt: skip
    fig.tight_layout()

    def write(tmp: Path) -> None:
        fig.savefig(tmp, format="png")

    atomic_write(path, write)
    _pyplot().close(fig)
    return path
