"""Person boxes from a torchvision detector whose weights are a local file.

    detector = load_detector("fasterrcnn_resnet50_fpn_v2.pt", arch="fasterrcnn_resnet50_fpn_v2")
    detections = detector(rgb)          # (H, W, 3) uint8 -> [Detection] of COCO label 1

Nothing is downloaded: the architecture is built with ``weights=None,
weights_backbone=None`` and the state_dict is read with ``torch.load(weights_only=True)``
(save one with ``torch.save(model.state_dict(), path)`` where the torchvision weights can
be fetched). The detector is a COCO detector (91 classes); boxes of label 1 (person) at or
above ``score_threshold`` are kept, best first.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..config import ConfigError
from ..data.admission import file_problem
from .inputs import PERSON_CATEGORY, Detection

#: torchvision detection builders that can serve (all COCO-trained, label 1 = person).
ARCHITECTURES = (
    "fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn_v2", "fasterrcnn_mobilenet_v3_large_fpn",
    "fasterrcnn_mobilenet_v3_large_320_fpn", "retinanet_resnet50_fpn", "retinanet_resnet50_fpn_v2",
    "fcos_resnet50_fpn", "ssdlite320_mobilenet_v3_large", "maskrcnn_resnet50_fpn", "keypointrcnn_resnet50_fpn",
)
DEFAULT_ARCH = "fasterrcnn_resnet50_fpn_v2"


def build_detector(arch: str = DEFAULT_ARCH) -> torch.nn.Module:
    """The torchvision architecture without any weights (nothing is downloaded)."""
    import torchvision.models.detection as detection
    if arch not in ARCHITECTURES:
        raise ConfigError(f"--detector-arch {arch!r} is not one of {', '.join(ARCHITECTURES)}")
    kwargs = {"weights": None, "weights_backbone": None}
    if arch == "keypointrcnn_resnet50_fpn":
        kwargs["num_classes"] = 2
    return getattr(detection, arch)(**kwargs)


class Detector:
    """A loaded detector: RGB image -> person detections."""

    def __init__(self, model: torch.nn.Module, score_threshold: float = 0.5, device: str | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.score_threshold = float(score_threshold)

    @torch.no_grad()
    def __call__(self, rgb: np.ndarray, frame: int | None = None) -> list[Detection]:
        """(H, W, 3) uint8 RGB -> person boxes (x, y, w, h), best first."""
        image = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float().div_(255)
        out = self.model([image.to(self.device)])[0]
        keep = (out["labels"] == PERSON_CATEGORY) & (out["scores"] >= self.score_threshold)
        boxes, scores = out["boxes"][keep].cpu().double().numpy(), out["scores"][keep].cpu().numpy()
        order = np.argsort(-scores, kind="stable")
        return [Detection(bbox=(float(x0), float(y0), float(x1 - x0), float(y1 - y0)),
                          score=float(scores[i]), frame=frame)
                for i in order for x0, y0, x1, y1 in [boxes[i]]]


def load_detector(path: str, arch: str = DEFAULT_ARCH, score_threshold: float = 0.5,
                  device: str | None = None) -> Detector:
    """A detector from a local state_dict file (``ConfigError`` with one clear line if the
    file is missing, unreadable or of another architecture)."""
    file = Path(path)
    problem = file_problem(path)
    if problem:
        raise ConfigError(f"--detector {path}: {problem} (a torchvision detector's state_dict)")
    model = build_detector(arch)
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle/zip errors of many types: all mean unreadable
        raise ConfigError(f"--detector {path}: not a readable state_dict ({type(error).__name__})") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as error:
        first = str(error).strip().splitlines()[0]
        raise ConfigError(f"--detector {path}: does not fit --detector-arch {arch} ({first})") from None
    return Detector(model, score_threshold=score_threshold, device=device)
