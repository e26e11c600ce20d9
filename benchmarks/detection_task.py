"""The convergence study's task: a procedural detection dataset, a small Faster R-CNN
trained from fresh weights, and COCO mAP through pycocotools.

The dataset needs no download: every image is drawn from a seed. Four classes differ
by shape (disc, box, triangle, ring); colour, texture (solid, stripes, checks, noise),
size and aspect vary within each class, on backgrounds of colour gradients and line
clutter, with faint noise over the whole image, so neither colour nor texture gives the
class away.
"""

import contextlib
import io
import math
from collections import OrderedDict
from typing import Dict, List, Sequence, Tuple

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign

ROI_SIZE = 5  # RoIAlign bins per side, one sample each: the small objects need no more, and the CPU
# backward of RoIAlign is most of a training step
CLASSES = ("disc", "box", "triangle", "ring")  # category id k + 1 is CLASSES[k]; 0 is background
Sample = Tuple[torch.Tensor, Dict[str, torch.Tensor]]


def _segment_distance(yy, xx, p0: torch.Tensor, p1: torch.Tensor) -> torch.Tensor:
    d = p1 - p0
    t = (((xx - p0[0]) * d[0] + (yy - p0[1]) * d[1]) / d.dot(d).clamp_min(1e-6)).clamp(0, 1)
    return torch.hypot(xx - p0[0] - t * d[0], yy - p0[1] - t * d[1])


def _shape_mask(kind: str, yy, xx, x0: float, y0: float, w: float, h: float, gen: torch.Generator):
    cx, cy, rx, ry = x0 + w / 2, y0 + h / 2, w / 2, h / 2
    r2 = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2
    if kind == "disc":
        return r2 <= 1
    if kind == "box":
        return (xx >= x0) & (xx < x0 + w) & (yy >= y0) & (yy < y0 + h)
    if kind == "ring":
        inner = 0.35 + 0.25 * float(torch.rand((), generator=gen))
        return (r2 <= 1) & (r2 >= inner**2)
    # triangle, apex up or down: |x − cx| ≤ (w/2)·(distance from the apex)/h
    up = bool(torch.rand((), generator=gen) < 0.5)
    depth = (yy - y0) if up else (y0 + h - yy)
    return (depth >= 0) & (depth < h) & ((xx - cx).abs() <= rx * depth / h)


def _texture(size: int, yy, xx, gen: torch.Generator) -> torch.Tensor:
    """A [3, size, size] fill: solid, stripes, checks or noise in two random colours."""
    ca, cb = torch.rand(3, 1, 1, generator=gen), torch.rand(3, 1, 1, generator=gen)
    kind = int(torch.randint(0, 4, (), generator=gen))
    period = float(torch.randint(3, 7, (), generator=gen))
    if kind == 0:
        return ca.expand(3, size, size)
    if kind == 1:
        angle = math.pi / 4 * int(torch.randint(0, 4, (), generator=gen))
        phase = (xx * math.cos(angle) + yy * math.sin(angle)) / period
        return torch.where(phase.floor().remainder(2) == 0, ca, cb)
    if kind == 2:
        return torch.where(((xx / period).floor() + (yy / period).floor()).remainder(2) == 0, ca, cb)
    return (ca + 0.2 * torch.randn(3, size, size, generator=gen)).clamp(0, 1)


def _background(size: int, yy, xx, gen: torch.Generator) -> torch.Tensor:
    c0, c1 = torch.rand(3, 1, 1, generator=gen), torch.rand(3, 1, 1, generator=gen)
    angle = 2 * math.pi * float(torch.rand((), generator=gen))
    ramp = ((xx * math.cos(angle) + yy * math.sin(angle)) / (size * math.sqrt(2)) + 0.5).clamp(0, 1)
    image = c0 * (1 - ramp) + c1 * ramp
    for _ in range(int(torch.randint(3, 9, (), generator=gen))):  # line clutter
        p0, p1 = torch.rand(2, generator=gen) * size, torch.rand(2, generator=gen) * size
        width = 0.5 + float(torch.rand((), generator=gen))
        image = torch.where(_segment_distance(yy, xx, p0, p1) <= width, torch.rand(3, 1, 1, generator=gen), image)
    return image


def make_image(size: int, gen: torch.Generator, max_objects: int = 4) -> Sample:
    """One image in [0, 1] and its target: boxes (x0, y0, x1, y1) tight around each drawn
    shape, labels in 1..len(CLASSES). Objects do not overlap, so every box is fully visible."""
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    image = _background(size, yy, xx, gen)
    boxes: List[List[float]] = []
    labels: List[int] = []
    wanted = int(torch.randint(1, max_objects + 1, (), generator=gen))
    for _ in range(8 * wanted):
        if len(boxes) == wanted:
            break
        w, h = (torch.randint(size // 8, size // 2 + 1, (2,), generator=gen)).tolist()
        h = min(max(h, w // 2), 2 * w)  # aspect within [1/2, 2]
        x0, y0 = (
            float(torch.randint(0, size - w + 1, (), generator=gen)),
            float(torch.randint(0, size - h + 1, (), generator=gen)),
        )
        k = int(torch.randint(0, len(CLASSES), (), generator=gen))
        mask = _shape_mask(CLASSES[k], yy, xx, x0, y0, w, h, gen)
        ys, xs = mask.nonzero(as_tuple=True)
        if xs.numel() == 0:
            continue
        box = [float(xs.min()), float(ys.min()), float(xs.max()) + 1, float(ys.max()) + 1]
        if box[2] - box[0] < 3 or box[3] - box[1] < 3 or any(_overlaps(box, b) for b in boxes):
            continue
        image = torch.where(mask, _texture(size, yy, xx, gen), image)
        boxes.append(box)
        labels.append(k + 1)
    image = (image + 0.04 * torch.randn(image.shape, generator=gen)).clamp(0, 1)
    return image, {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
    }


def _overlaps(a: Sequence[float], b: Sequence[float]) -> bool:
    return min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])


def make_dataset(n: int, size: int, seed: int) -> List[Sample]:
    gen = torch.Generator().manual_seed(seed)
    return [make_image(size, gen) for _ in range(n)]


class TinyFPNBackbone(nn.Module):
    """Three GroupNorm conv stages at strides 4, 8, 16 and an FPN over them.

    GroupNorm, not BatchNorm: its output does not depend on the batch, so gradient
    accumulation over micro-batches gives exactly the large batch's gradient.
    """

    def __init__(self, widths: Sequence[int] = (16, 32, 64), out_channels: int = 32) -> None:
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.GroupNorm(8, cout), nn.ReLU(inplace=True)
            )

        w0, w1, w2 = widths
        self.stages = nn.ModuleList([
            nn.Sequential(block(3, w0, 2), block(w0, w0, 2)),
            nn.Sequential(block(w0, w1, 2), block(w1, w1, 1)),
            nn.Sequential(block(w1, w2, 2), block(w2, w2, 1)),
        ])  # fmt: skip
        self.fpn = FeaturePyramidNetwork(list(widths), out_channels)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        features = OrderedDict()
        for i, stage in enumerate(self.stages):
            x = stage(x)
            features[str(i)] = x
        return self.fpn(features)


def build_detector(image_size: int, seed: int) -> FasterRCNN:
    """A Faster R-CNN with FPN sized for ``image_size`` images, fresh weights from ``seed``."""
    torch.manual_seed(seed)
    backbone = TinyFPNBackbone()
    levels = ["0", "1", "2"]
    anchors = AnchorGenerator(sizes=tuple((image_size // s,) for s in (8, 4, 2)), aspect_ratios=((0.5, 1.0, 2.0),) * 3)
    # Boxes of side image_size/2 pool from stride 16, /4 from stride 8, /8 from stride 4.
    roi_pool = MultiScaleRoIAlign(levels, ROI_SIZE, 1, canonical_scale=image_size // 2, canonical_level=4)
    return FasterRCNN(
        backbone, min_size=image_size, max_size=image_size,
        image_mean=[0.5] * 3, image_std=[0.25] * 3,
        rpn_anchor_generator=anchors, rpn_pre_nms_top_n_train=300, rpn_post_nms_top_n_train=100,
        rpn_pre_nms_top_n_test=150, rpn_post_nms_top_n_test=50, rpn_batch_size_per_image=64,
        box_roi_pool=roi_pool, box_head=TwoMLPHead(backbone.out_channels * ROI_SIZE**2, 128),
        box_predictor=FastRCNNPredictor(128, len(CLASSES) + 1),
        box_batch_size_per_image=32, box_detections_per_img=20, box_score_thresh=0.01,
    )  # fmt: skip


def coco_map(
    targets: Sequence[Dict[str, torch.Tensor]], predictions: Sequence[Dict[str, torch.Tensor]]
) -> Dict[str, float]:
    """COCO box AP by pycocotools' COCOeval: ``mAP`` = AP@[.5:.95], ``AP50`` = AP@.5.

    ``targets[i]`` holds the ground truth ``boxes``/``labels`` of image i, ``predictions[i]``
    the detections ``boxes``/``labels``/``scores``; boxes are (x0, y0, x1, y1) in pixels.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if len(targets) != len(predictions):
        raise ValueError(f"{len(targets)} targets but {len(predictions)} predictions")

    def xywh(box: torch.Tensor) -> List[float]:
        x0, y0, x1, y1 = box.tolist()
        return [x0, y0, x1 - x0, y1 - y0]

    images, annotations, detections = [], [], []
    for image_id, (target, pred) in enumerate(zip(targets, predictions)):
        images.append({"id": image_id})
        for box, label in zip(target["boxes"], target["labels"]):
            x, y, w, h = xywh(box)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": int(label),
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})  # fmt: skip
        for box, label, score in zip(pred["boxes"], pred["labels"], pred["scores"]):
            detections.append(
                {"image_id": image_id, "category_id": int(label), "bbox": xywh(box), "score": float(score)}
            )
    if not detections:  # loadRes cannot take an empty list; no detection is AP 0
        return {"mAP": 0.0, "AP50": 0.0}
    ground_truth = COCO()
    ground_truth.dataset = {"images": images, "annotations": annotations,
                            "categories": [{"id": k + 1, "name": name} for k, name in enumerate(CLASSES)]}  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress and the table
        ground_truth.createIndex()
        evaluation = COCOeval(ground_truth, ground_truth.loadRes(detections), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return {"mAP": float(evaluation.stats[0]), "AP50": float(evaluation.stats[1])}


@torch.no_grad()
def evaluate(model: FasterRCNN, data: Sequence[Sample], batch: int = 16) -> Dict[str, float]:
    model.eval()
    predictions: List[Dict[str, torch.Tensor]] = []
    device = next(model.parameters()).device
    for i in range(0, len(data), batch):
        images = [image.to(device) for image, _ in data[i : i + batch]]
        predictions += [{k: v.cpu() for k, v in p.items()} for p in model(images)]
    model.train()
    return coco_map([target for _, target in data], predictions)


__all__ = [
    "CLASSES",
    "Sample",
    "make_image",
    "make_dataset",
    "TinyFPNBackbone",
    "build_detector",
    "coco_map",
    "evaluate",
]
