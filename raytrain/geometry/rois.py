"""RoI schedules (docs/method.md §2): which M boxes are cropped around each detected box.

A schedule maps boxes (N, 3) to RoI boxes (N, M, 3); RoI 0 is always the detected box.
Schedules are small builders in a registry so the schedule is a tunable hyperparameter.
"""
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..registry import Registry

# Paper schedule for RoIs 1..4 (RoI 0 is the detected box), offsets in units of b.
PAPER_OFFSETS = torch.tensor([[0.1, 0.0], [-0.1, 0.0], [0.0, 0.1], [0.0, -0.1]])
PAPER_SCALES = torch.tensor([1.5, 1.25, 0.8, 0.65])
# Offset directions of the fixed schedule, scaled by its offset magnitude.
FIXED_DIRECTIONS = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
MAX_ROIS = 5


def multi_roi_boxes(boxes: torch.Tensor, offsets: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """boxes (..., 3), offsets (..., K, 2) in units of b, scales (..., K) -> (..., K+1, 3).

    RoI k+1 = (cx + ox_k b, cy + oy_k b, b r_k); index 0 is the original box.
    """
    offsets = offsets.to(boxes)
    scales = scales.to(boxes)
    b = boxes[..., None, 2:3]                                           # (..., 1, 1)
    centres = boxes[..., None, :2] + offsets * b                        # (..., K, 2)
    sizes = b * scales[..., None]                                       # (..., K, 1)
    shifted = torch.cat([centres, sizes], dim=-1)
    return torch.cat([boxes[..., None, :], shifted], dim=-2)


@dataclass
class FixedSchedule:
    """The paper's schedule, with tunable offset magnitude and resize factors."""
    num_rois: int = 5
    offset: float = 0.1
    scales: Sequence[float] = (1.5, 1.25, 0.8, 0.65)

    def __post_init__(self):
        _check_num_rois(self.num_rois)
        if len(self.scales) < self.num_rois - 1:
            raise ValueError(f"fixed schedule needs {self.num_rois - 1} scales, got {len(self.scales)}")

    @classmethod
    def from_config(cls, rois) -> "FixedSchedule":
        return cls(rois.num_rois, offset=rois.offset, scales=tuple(rois.scales))

    def boxes(self, boxes: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        k = self.num_rois - 1
        offsets = FIXED_DIRECTIONS[:k] * self.offset
        scales = torch.as_tensor(list(self.scales[:k]), dtype=torch.float32)
        return multi_roi_boxes(boxes, offsets, scales)

    def extent(self):
        """(largest reach from the box centre in units of b, smallest RoI scale)."""
        return _extent(FIXED_DIRECTIONS[: self.num_rois - 1] * self.offset,
                       torch.as_tensor(list(self.scales[: self.num_rois - 1])))


@dataclass
class RandomSchedule:
    """Offsets and resize factors drawn per sample from uniform ranges."""
    num_rois: int = 5
    max_offset: float = 0.1
    scale_min: float = 0.65
    scale_max: float = 1.5

    def __post_init__(self):
        _check_num_rois(self.num_rois)
        if not 0 < self.scale_min <= self.scale_max:
            raise ValueError(f"random schedule needs 0 < scale_min <= scale_max, got "
                             f"{self.scale_min}, {self.scale_max}")

    @classmethod
    def from_config(cls, rois) -> "RandomSchedule":
        return cls(rois.num_rois, max_offset=rois.max_offset, scale_min=rois.scale_min, scale_max=rois.scale_max)

    def boxes(self, boxes: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        k = self.num_rois - 1
        lead = boxes.shape[:-1]
        u = torch.rand(*lead, k, 3, generator=generator)
        offsets = (2 * u[..., :2] - 1) * self.max_offset
        scales = self.scale_min + (self.scale_max - self.scale_min) * u[..., 2]
        return multi_roi_boxes(boxes, offsets, scales)

    def extent(self):
        reach = self.max_offset * 2 ** 0.5
        return reach + self.scale_max / 2, min(self.scale_min, 1.0)


def _extent(offsets: torch.Tensor, scales: torch.Tensor):
    if len(scales) == 0:
        return 0.5, 1.0
    reach = (offsets.abs().max(dim=-1).values + scales / 2).max().item()
    return max(reach, 0.5), min(scales.min().item(), 1.0)


def _check_num_rois(num_rois: int):
    if not 1 <= num_rois <= MAX_ROIS:
        raise ValueError(f"num_rois must be in 1..{MAX_ROIS}, got {num_rois}")


#: name -> schedule class with `from_config(rois)` (a RoIConfig-like object) and
#: `__init__(num_rois, **settings)`.
SCHEDULES = Registry("RoI schedule")
SCHEDULES.register("paper", FixedSchedule)
SCHEDULES.register("fixed", FixedSchedule)
SCHEDULES.register("random", RandomSchedule)


def build_schedule(kind: str = "paper", num_rois: int = 5, **kwargs):
    """Build the registered schedule `kind` with its own settings."""
    return SCHEDULES.get(kind)(num_rois=num_rois, **kwargs)


def schedule_from_config(rois):
    """The schedule a RoIConfig describes (`rois.schedule` looked up in the registry)."""
    return SCHEDULES.get(rois.schedule).from_config(rois)


def schedule_names() -> list[str]:
    return SCHEDULES.names()
