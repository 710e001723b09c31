"""Geometry against hand-worked values (docs/method.md §2, §4, §5)."""
import math

import pytest
import torch

from raytrain.geometry import (
    PAPER_OFFSETS,
    PAPER_SCALES,
    axis_angle_to_rotmat,
    bbox_info,
    build_schedule,
    cam_crop_to_full,
    cam_full_to_crop,
    default_focal,
    multi_roi_boxes,
    perspective_projection,
    rot6d_to_rotmat,
    rotmat_to_axis_angle,
    rotmat_to_rot6d,
    to_roi_coords,
)


def test_paper_schedule_boxes_by_hand():
    boxes = torch.tensor([[100.0, 200.0, 50.0]])
    rois = multi_roi_boxes(boxes, PAPER_OFFSETS, PAPER_SCALES)
    expected = torch.tensor([[[100, 200, 50], [105, 200, 75], [95, 200, 62.5],
                              [100, 205, 40], [100, 195, 32.5]]])
    assert rois.shape == (1, 5, 3)
    assert torch.allclose(rois, expected)


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5])
def test_schedules_give_m_rois_with_original_first(m):
    boxes = torch.tensor([[10.0, 20.0, 30.0], [1.0, 2.0, 3.0]])
    for kind in ("paper", "random"):
        rois = build_schedule(kind, m).boxes(boxes, torch.Generator().manual_seed(0))
        assert rois.shape == (2, m, 3)
        assert torch.equal(rois[:, 0], boxes)


def test_random_schedule_is_seeded_and_within_ranges():
    sched = build_schedule("random", 5, max_offset=0.2, scale_min=0.7, scale_max=1.3)
    boxes = torch.tensor([[0.0, 0.0, 10.0]]).repeat(100, 1)
    a = sched.boxes(boxes, torch.Generator().manual_seed(3))
    b = sched.boxes(boxes, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert a[:, 1:, :2].abs().max() <= 2.0 + 1e-6
    assert a[:, 1:, 2].min() >= 7.0 - 1e-6 and a[:, 1:, 2].max() <= 13.0 + 1e-6


def test_bad_schedule_arguments():
    with pytest.raises(ValueError, match="num_rois"):
        build_schedule("paper", 6)
    with pytest.raises(ValueError, match="unknown RoI schedule"):
        build_schedule("spiral", 3)


def test_default_focal_and_bbox_info_by_hand():
    size = torch.tensor([[300.0, 400.0]])
    f = default_focal(size)
    assert torch.allclose(f, torch.tensor([500.0]))
    info = bbox_info(torch.tensor([[250.0, 100.0, 200.0]]), size, f)
    # ((250-150)/500*2.8, (100-200)/500*2.8, (200-120)/30)
    assert torch.allclose(info, torch.tensor([[0.56, -0.56, 80 / 30]]))


def test_cam_crop_to_full_by_hand():
    # box centred 100 px right of the image centre, b = 200, s = 0.5 -> b s = 100
    cam = torch.tensor([0.5, 0.1, -0.2])
    box = torch.tensor([600.0, 300.0, 200.0])
    size = torch.tensor([1000.0, 600.0])
    full = cam_crop_to_full(cam, box, size, torch.tensor(1000.0))
    assert torch.allclose(full, torch.tensor([0.1 + 2.0, -0.2 + 0.0, 20.0]))
    assert torch.allclose(cam_full_to_crop(full, box, size, torch.tensor(1000.0)), cam)


def test_full_camera_reprojects_like_the_crop_camera():
    """A point projected with the full camera lands where the weak-perspective crop camera
    puts it (for a point at the body origin: exact)."""
    size = torch.tensor([[640.0, 480.0]])
    focal = default_focal(size)
    box = torch.tensor([[400.0, 180.0, 120.0]])
    cam = torch.tensor([[0.9, 0.05, -0.1]])
    full = cam_crop_to_full(cam, box, size, focal)
    origin = torch.zeros(1, 1, 3)
    pixel = perspective_projection(origin, full, focal, size)           # (1, 1, 2)
    # weak perspective in the crop's normalised frame: x_n = s * (X + tx) with X = 0
    expected_norm = cam[:, 0:1] * cam[:, 1:3]
    assert torch.allclose(to_roi_coords(pixel, box)[:, 0], expected_norm, atol=1e-5)


def test_rotations_roundtrip_and_known_values():
    aa = torch.tensor([0.0, 0.0, math.pi / 2])
    rot = axis_angle_to_rotmat(aa)
    assert torch.allclose(rot, torch.tensor([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]]), atol=1e-6)
    g = torch.Generator().manual_seed(0)
    aa = torch.randn(500, 3, generator=g)
    aa = aa / aa.norm(dim=-1, keepdim=True) * torch.rand(500, 1, generator=g) * 3.0
    R = axis_angle_to_rotmat(aa)
    assert torch.allclose(rotmat_to_axis_angle(R), aa, atol=1e-4)
    assert torch.allclose(rot6d_to_rotmat(rotmat_to_rot6d(R)), R, atol=1e-5)
    assert torch.allclose(axis_angle_to_rotmat(torch.zeros(3)), torch.eye(3))
