"""Losses and metrics against hand-worked cases; gradient checks in float64."""
import math

import pytest
import torch

from raytrain.eval.metrics import mpjpe, pa_mpjpe, procrustes_align, pve
from raytrain.geometry import axis_angle_to_rotmat, cam_full_to_crop, default_focal
from raytrain.losses import camera_consistency_loss, contrastive_loss


def _consistent_cameras(n=3, m=5, dtype=torch.float64, seed=0):
    """Local cameras all derived from one full camera per person (inverse formula)."""
    g = torch.Generator().manual_seed(seed)
    size = torch.tensor([[1920.0, 1080.0]], dtype=dtype).repeat(n, 1)
    focal = default_focal(size)
    centres = torch.rand(n, m, 2, generator=g, dtype=dtype) * size[:, None] * 0.5 + size[:, None] * 0.25
    boxes = torch.cat([centres, 100 + 300 * torch.rand(n, m, 1, generator=g, dtype=dtype)], -1)
    full = torch.cat([torch.randn(n, 2, generator=g, dtype=dtype) * 0.3,
                      5 + 10 * torch.rand(n, 1, generator=g, dtype=dtype)], -1)
    cam = cam_full_to_crop(full[:, None].expand(n, m, 3), boxes, size[:, None], focal[:, None])
    return cam, boxes, size, focal


def test_camera_loss_zero_for_consistent_cameras_positive_otherwise():
    cam, boxes, size, focal = _consistent_cameras()
    assert camera_consistency_loss(cam, boxes, size, focal).item() < 1e-12
    bumped = cam.clone()
    bumped[:, 2, 1] += 0.05
    assert camera_consistency_loss(bumped, boxes, size, focal).item() > 1e-6


def test_camera_loss_by_hand():
    # Two RoIs centred on the image centre, b = 100: X = tx, Y = ty, S = 100 s.
    size = torch.tensor([[200.0, 200.0]])
    boxes = torch.tensor([[[100.0, 100.0, 100.0], [100.0, 100.0, 100.0]]])
    cam = torch.tensor([[[1.0, 0.0, 0.0], [1.1, 1.0, 2.0]]])
    loss = camera_consistency_loss(cam, boxes, size, torch.tensor([300.0]))
    per_pair = 0.1 * 1.0 + 0.1 * 4.0 + 1e-4 * 10.0 ** 2
    assert loss.item() == pytest.approx(2 * per_pair, rel=1e-5)        # ordered pairs (0,1), (1,0)


def test_contrastive_loss_on_orthogonal_features():
    # Positives orthogonal (sim 0), two negatives of sim 0: each term is -log(1/2).
    z = torch.eye(4).reshape(2, 2, 4)
    assert contrastive_loss(z, tau=0.5).item() == pytest.approx(2 * math.log(2), rel=1e-6)


def test_contrastive_loss_prefers_aligned_positives():
    aligned = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]])
    mixed = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]]])
    assert contrastive_loss(aligned) < contrastive_loss(mixed)
    # hand value for `aligned`: pos sim 1/tau=2, negatives two of sim 0 -> -log(e^2/2) per term
    assert contrastive_loss(aligned).item() == pytest.approx(2 * (math.log(2) - 2), rel=1e-6)


def test_contrastive_loss_rejects_small_batches():
    with pytest.raises(ValueError, match="2 persons"):
        contrastive_loss(torch.randn(1, 3, 8))
    with pytest.raises(ValueError, match="2 RoIs"):
        contrastive_loss(torch.randn(4, 1, 8))


def test_contrastive_extra_negatives_enter_the_denominator():
    z = torch.eye(4).reshape(2, 2, 4)
    extra = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    # anchor e1 now has negatives sims 0, 0, 1/tau = 2 ...; loss must rise
    assert contrastive_loss(z, extra_negatives=extra) > contrastive_loss(z)


def test_gradcheck_losses():
    cam, boxes, size, focal = _consistent_cameras(n=2, m=3)
    cam = (cam + 0.01 * torch.randn_like(cam)).requires_grad_()
    assert torch.autograd.gradcheck(lambda c: camera_consistency_loss(c, boxes, size, focal), (cam,))
    z = torch.randn(3, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: contrastive_loss(x, 0.5), (z,))


def test_mpjpe_and_pve_by_hand():
    gt = torch.zeros(1, 2, 3)
    pred = torch.tensor([[[3.0, 4.0, 0.0], [0.0, 0.0, 1.0]]])
    assert mpjpe(pred, gt).item() == pytest.approx(3.0)
    assert pve(pred, gt).item() == pytest.approx(3.0)


def test_pa_mpjpe_removes_similarity_transform():
    g = torch.Generator().manual_seed(1)
    gt = torch.randn(4, 14, 3, generator=g, dtype=torch.float64)
    rot = axis_angle_to_rotmat(torch.tensor([[0.3, -1.2, 0.5]], dtype=torch.float64))
    pred = 1.7 * gt @ rot.transpose(1, 2) + torch.tensor([0.5, -2.0, 3.0], dtype=torch.float64)
    assert pa_mpjpe(pred, gt).max().item() < 1e-9
    assert mpjpe(pred, gt).min().item() > 0.1
    assert torch.allclose(procrustes_align(pred, gt), gt, atol=1e-9)


def test_pa_mpjpe_does_not_reflect():
    gt = torch.randn(1, 10, 3, dtype=torch.float64)
    mirrored = gt * torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64)
    assert pa_mpjpe(mirrored, gt).item() > 1e-3
