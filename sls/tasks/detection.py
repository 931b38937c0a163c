"""Object detection: torchvision's detectors on a simple feature pyramid, COCO mAP.

The encoder's last kept map (after the final norm) feeds a ViTDet-style simple feature
pyramid (:class:`SimpleFeaturePyramid`): a 2x transposed convolution, the map itself and
a 2x max-pool give three levels at half, one and two times the encoder's stride, each
projected to ``channels`` by a 1x1 and a 3x3 convolution. A torchvision detector reads
the levels: FCOS (the default: anchor-free, one anchor per location sized to its
level's stride) or RetinaNet, or Faster R-CNN. Its image transform is told the images
are already resized and normalised (min = max size, zero mean, unit std), and pads to
the encoder's stride. The pyramid and detector train with the PETL modules; the
encoder stays frozen.

The criterion's samples are boxes (see :func:`choose_rois`): each block's map,
RoI-aligned (2 x 2, averaged) over each ground-truth box, is the box's feature, its
class the label; background boxes (placed where no object is, sized like the objects)
are one more class, so a set with one class still has two. A class-balanced, seeded
sample of at most ``samples`` boxes is scored, the same boxes for every block.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections import OrderedDict

import numpy as np
import torch
from torch import nn
from torchvision.ops import box_iou, roi_align
from tqdm.auto import tqdm

from sls.backbones import BlockFeatures
from sls.errors import ConfigError, DataError
from sls.runtime import Runtime, model_device
from sls.tasks import register_task
from sls.tasks.dense import DenseModel, DenseTask, gather_blocks

DETECTORS = ("fcos", "retinanet", "fasterrcnn")
CHANNELS = 64
SCORE_THRESHOLD = 0.05
"""Detections kept for mAP (COCO practice; a deployment would raise it)."""
BACKGROUND_IOU = 0.1
"""A background box overlaps every object by less than this IoU."""
SAMPLE_SEED = 0


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple pyramid from one map: levels at stride/2, stride and 2*stride."""

    def __init__(self, width: int, channels: int = CHANNELS) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(width, width // 2, kernel_size=2, stride=2)
        self.down = nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True)
        self.project = nn.ModuleList(
            nn.Sequential(nn.Conv2d(w, channels, 1), nn.GroupNorm(16, channels),
                          nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(16, channels))  # fmt: skip
            for w in (width // 2, width, width)
        )

    def forward(self, feature_map: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        levels = (self.up(feature_map), feature_map, self.down(feature_map))
        return OrderedDict((f"p{i}", project(level)) for i, (project, level) in enumerate(zip(self.project, levels)))


class _PyramidBackbone(nn.Module):
    """What a torchvision detector calls its backbone: the owner's encoder map through the
    pyramid. The encoder is the owner's (not registered here, so its tensors have one name)."""

    def __init__(self, owner: DetectionModel, width: int, channels: int) -> None:
        super().__init__()
        self.pyramid = SimpleFeaturePyramid(width, channels)
        self.out_channels = channels
        object.__setattr__(self, "_owner", owner)

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.pyramid(self._owner.feature_map(images))


def encoder_stride(encoder: nn.Module, img_size: int) -> int:
    """Pixels per cell of the encoder's last map at ``img_size``."""
    device = next(encoder.parameters()).device
    with torch.no_grad():
        side = encoder.forward_features(torch.zeros(1, 3, img_size, img_size, device=device))
    cells = side.shape[1] if side.dim() == 4 else int(math.isqrt(side.shape[1] - encoder.num_prefix_tokens))
    return img_size // cells


def build_detector(kind: str, backbone: nn.Module, num_classes: int, img_size: int, stride: int) -> nn.Module:
    """A torchvision detector over the three pyramid levels (strides stride/2, stride, 2*stride)."""
    from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.fcos import FCOSHead
    from torchvision.models.detection.retinanet import RetinaNetHead
    from torchvision.ops import MultiScaleRoIAlign

    strides = (max(1, stride // 2), stride, 2 * stride)
    common = dict(min_size=img_size, max_size=img_size, image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0],
                  size_divisible=stride)  # fmt: skip
    channels = backbone.out_channels
    if kind == "fcos":
        anchors = AnchorGenerator(sizes=tuple((s,) for s in strides), aspect_ratios=((1.0,),) * 3)
        head = FCOSHead(channels, 1, num_classes, num_convs=2)
        return FCOS(backbone, num_classes, anchor_generator=anchors, head=head, score_thresh=SCORE_THRESHOLD,
                    **common)  # fmt: skip
    if kind == "retinanet":
        sizes = tuple(tuple(4 * s * 2 ** (i / 3) for i in range(3)) for s in strides)
        anchors = AnchorGenerator(sizes=sizes, aspect_ratios=((0.5, 1.0, 2.0),) * 3)
        head = RetinaNetHead(channels, anchors.num_anchors_per_location()[0], num_classes)
        return RetinaNet(backbone, num_classes, anchor_generator=anchors, head=head, score_thresh=SCORE_THRESHOLD,
                         **common)  # fmt: skip
    if kind == "fasterrcnn":  # label 0 is its background: DetectionModel shifts the labels by one
        anchors = AnchorGenerator(sizes=tuple((4 * s,) for s in strides), aspect_ratios=((0.5, 1.0, 2.0),) * 3)
        pool = MultiScaleRoIAlign(featmap_names=["p0", "p1", "p2"], output_size=7, sampling_ratio=2)
        return FasterRCNN(backbone, num_classes + 1, rpn_anchor_generator=anchors, box_roi_pool=pool,
                          rpn_pre_nms_top_n_train=500, rpn_post_nms_top_n_train=200, rpn_pre_nms_top_n_test=300,
                          rpn_post_nms_top_n_test=100, box_batch_size_per_image=128,
                          box_score_thresh=SCORE_THRESHOLD, **common)  # fmt: skip
    raise ConfigError(f"unknown detector {kind!r}; choose one of: {', '.join(DETECTORS)}")


class DetectionModel(DenseModel):
    """Encoder + pyramid + torchvision detector (``head``). ``model(images)`` gives one
    ``{"boxes", "scores", "labels"}`` dict per image (labels 0..C-1); ``model(images,
    targets)`` the sum of the detector's losses."""

    def __init__(self, encoder: nn.Module, num_classes: int, img_size: int, detector: str = "fcos",
                 channels: int = CHANNELS) -> None:  # fmt: skip
        super().__init__(encoder)
        self.num_classes, self.img_size, self.detector, self.channels = num_classes, img_size, detector, channels
        self.head = self.make_head()
        self.head_width = self.width

    def make_head(self) -> nn.Module:
        stride = encoder_stride(self.encoder, self.img_size)
        backbone = _PyramidBackbone(self, self.width, self.channels)
        return build_detector(self.detector, backbone, self.num_classes, self.img_size, stride)

    @torch.no_grad()
    def narrow_inputs(self, kept: torch.Tensor) -> None:
        """Keep only the pyramid's input channels ``kept`` (the encoder's residual
        channels a width pruning kept, in order): the inputs of the transposed
        convolution ``up`` (its weight is ``(in, out, kh, kw)``) and of the first
        convolution of the two levels that read the map itself (``project[1]``,
        ``project[2]``); ``project[0]`` reads ``up``'s output and is unchanged. In place;
        ``head_width`` follows."""
        kept = torch.as_tensor(kept, dtype=torch.long)
        pyramid = self.head.backbone.pyramid
        index = kept.to(pyramid.up.weight.device)
        for conv, dim in ((pyramid.up, 0), (pyramid.project[1][0], 1), (pyramid.project[2][0], 1)):
            conv.weight = nn.Parameter(conv.weight.index_select(dim, index).clone(), conv.weight.requires_grad)
            conv.in_channels = len(kept)
        self.head_width = len(kept)

    def forward(self, images: torch.Tensor, targets: list[dict] | None = None):
        shift = 1 if self.detector == "fasterrcnn" else 0
        if targets is None:
            if self.training:
                raise ValueError("a detector in training mode needs targets")
            out = self.head(list(images))
            return [{**d, "labels": d["labels"] - shift} for d in out] if shift else out
        if shift:
            targets = [{**t, "labels": t["labels"] + shift} for t in targets]
        losses = self.head(list(images), targets)
        return sum(losses.values())


def coco_map(detections: list[dict], targets: list[dict], num_classes: int) -> dict:
    """COCO box mAP (IoU 0.50:0.95), mAP@50 and mAP@75 by pycocotools, from per-image
    ``{"boxes" xyxy, "scores", "labels"}`` detections and ``{"boxes", "labels"}`` targets."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, annotations, results = [], [], []
    for image_id, (found, truth) in enumerate(zip(detections, targets)):
        images.append({"id": image_id})
        for box, label in zip(truth["boxes"].tolist(), truth["labels"].tolist()):
            x1, y1, x2, y2 = box
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": int(label),
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})  # fmt: skip
        for box, score, label in zip(found["boxes"].tolist(), found["scores"].tolist(), found["labels"].tolist()):
            x1, y1, x2, y2 = box
            results.append({"image_id": image_id, "category_id": int(label), "bbox": [x1, y1, x2 - x1, y2 - y1],
                            "score": float(score)})  # fmt: skip
    if not annotations:
        raise DataError("the evaluated images hold no object to detect")
    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO()
        truth.dataset = {"images": images, "annotations": annotations,
                         "categories": [{"id": c} for c in range(num_classes)]}  # fmt: skip
        truth.createIndex()
        if not results:
            return {"mAP": 0.0, "mAP50": 0.0, "mAP75": 0.0, "detections": 0}
        found = truth.loadRes(results)
        evaluation = COCOeval(truth, found, "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    stats = [max(0.0, float(v)) for v in evaluation.stats[:3]]
    return {"mAP": stats[0], "mAP50": stats[1], "mAP75": stats[2], "detections": len(results)}


@torch.inference_mode()
def detect(model: nn.Module, loader, *, desc: str = "detect", progress: bool = True,
           runtime: Runtime | None = None) -> tuple[list[dict], list[dict]]:  # fmt: skip
    """The model's detections (on the CPU) and the targets of every image, in loader order."""
    runtime, device = runtime or Runtime(), model_device(model)
    model.eval()
    found, truth = [], []
    for images, targets in tqdm(loader, desc=desc, unit="batch", disable=not progress):
        with runtime.autocast(device):
            out = model(runtime.inputs(images, device))
        found += [{key: value.float().cpu() if key != "labels" else value.cpu() for key, value in d.items()} for d in out]
        truth += targets
    return found, truth


def background_boxes(boxes: torch.Tensor, img_size: int, count: int, rng: np.random.Generator,
                     tries: int = 50) -> torch.Tensor:  # fmt: skip
    """Up to ``count`` boxes sized like ``boxes`` (or a quarter of the image when there
    are none) that overlap every one of them by IoU < :data:`BACKGROUND_IOU`."""
    sides = (boxes[:, 2:] - boxes[:, :2]).tolist() if len(boxes) else [[img_size / 4, img_size / 4]]
    placed = []
    for _ in range(count):
        for _ in range(tries):
            w, h = sides[int(rng.integers(len(sides)))]
            x, y = rng.uniform(0, img_size - w), rng.uniform(0, img_size - h)
            box = torch.tensor([[x, y, x + w, y + h]], dtype=torch.float32)
            if not len(boxes) or float(box_iou(box, boxes).max()) < BACKGROUND_IOU:
                placed.append(box)
                break
    return torch.cat(placed) if placed else torch.zeros(0, 4)


def choose_rois(targets: list[dict], num_classes: int, img_size: int, samples: int | None,
                seed: int = SAMPLE_SEED) -> list[tuple[int, list[float], int]]:  # fmt: skip
    """A class-balanced, seeded sample of ``(image, box, label)``: the ground-truth boxes
    and as many background boxes per image as it has objects (at least one), label
    ``num_classes``; every label gets up to ``ceil(samples / labels)``. Sorted by image."""
    rng = np.random.default_rng(seed)
    candidates: dict[int, list[tuple[int, list[float]]]] = {}
    for image, target in enumerate(targets):
        boxes = target["boxes"].float()
        for box, label in zip(boxes.tolist(), target["labels"].tolist()):
            candidates.setdefault(int(label), []).append((image, box))
        for box in background_boxes(boxes, img_size, max(1, len(boxes)), rng).tolist():
            candidates.setdefault(num_classes, []).append((image, box))
    if len(candidates) < 2:
        raise DataError("the analysed images hold no box to score the blocks on")
    quota = None if samples is None else math.ceil(samples / len(candidates))
    chosen = []
    for label in sorted(candidates):
        items = candidates[label]
        if quota is not None and len(items) > quota:
            items = [items[i] for i in sorted(rng.choice(len(items), size=quota, replace=False))]
        chosen += [(image, box, label) for image, box in items]
    return sorted(chosen, key=lambda item: (item[0], item[1]))


def roi_features(feature_map: torch.Tensor, boxes: list[torch.Tensor], img_size: int) -> torch.Tensor:
    """``(n, C)``: each box's 2 x 2 RoI-aligned cells of an NCHW map, averaged (boxes in
    input pixels, one ``(k, 4)`` tensor per image of the batch)."""
    scale = feature_map.shape[-1] / img_size
    pooled = roi_align(feature_map.float(), [b.to(feature_map.device) for b in boxes], output_size=2,
                       spatial_scale=scale, sampling_ratio=2, aligned=True)  # fmt: skip
    return pooled.mean(dim=(2, 3)).cpu()


@register_task
class Detection(DenseTask):
    """Boxes: :class:`DetectionModel` (``--task-option detector=fcos|retinanet|fasterrcnn``,
    ``channels=64``), COCO mAP, RoI features of the boxes for the criteria."""

    name = "detection"
    metric = "mAP"

    def __init__(self, detector: str = "fcos", channels: int = CHANNELS, **options) -> None:
        if detector not in DETECTORS:
            raise ConfigError(f"unknown detector {detector!r}; choose one of: {', '.join(DETECTORS)}")
        if options:
            raise ConfigError(f"the detection task takes the options detector and channels, not {', '.join(options)}")
        if int(channels) < 16 or int(channels) % 16:
            raise ConfigError(f"channels must be a multiple of 16 (GroupNorm's groups), got {channels}")
        super().__init__(detector=detector, channels=int(channels))

    def build_model(self, encoder, num_classes, img_size):
        return DetectionModel(encoder, num_classes, img_size, self.options["detector"], self.options["channels"])

    def evaluate(self, model, loader, *, desc="evaluate", progress=True, runtime=None) -> dict:
        found, truth = detect(model, loader, desc=desc, progress=progress, runtime=runtime)
        return coco_map(found, truth, model.num_classes)

    @torch.inference_mode()
    def block_features(self, model, loader, *, samples=None, progress=True) -> BlockFeatures:
        dataset, encoder = loader.dataset, model.encoder
        model.eval()
        targets = [dataset.target(i) for i in range(len(dataset))]
        chosen = choose_rois(targets, model.num_classes, dataset.img_size, samples)
        by_image: dict[int, list[list[float]]] = {}
        for image, box, _ in chosen:
            by_image.setdefault(image, []).append(box)

        def pick(batch: list[int], feature_map: torch.Tensor) -> torch.Tensor:
            boxes = [torch.tensor(by_image[i], dtype=torch.float32) for i in batch]
            return roi_features(feature_map, boxes, dataset.img_size)

        labels = np.array([label for _, _, label in chosen], dtype=np.int64)
        return gather_blocks(encoder, dataset, sorted(by_image), pick, labels, batch_size=loader.batch_size,
                             progress=progress)  # fmt: skip
