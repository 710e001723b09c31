"""Evaluation protocols (docs/method.md §7) on top of the pure metrics, and the validation pass.

3DPW / H36M protocol: 14 LSP joints regressed from the mesh with the H36M regressor,
both skeletons aligned at the pelvis (mid-hips of the 14), errors in millimetres.
"""

import numpy as np
import torch

from ..body.joints import H36M_TO_J14
from ..data.errors import DataError
from ..data.pipeline import Loader
from ..data.reader import ShardReader
from ..geometry.camera import cam_crop_to_full, cam_full_to_crop
from ..model import normalize_images
from ..ranks import raise_if_stopped, stop_together
from .metrics import align_by_root, mpjpe, pa_mpjpe, per_joint_error, pve

PELVIS_J14 = (2, 3)  # right hip, left hip


def pelvis_j14(joints14: torch.Tensor) -> torch.Tensor:
    """(N, 14, 3) -> (N, 3) mid-hips."""
    return joints14[:, list(PELVIS_J14)].mean(dim=1)


def mesh_protocol(pred_h36m: torch.Tensor, gt_h36m: torch.Tensor, pred_vertices: torch.Tensor,
                  gt_vertices: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sample errors in mm. *_h36m (N, 17, 3) metres; *_vertices (N, V, 3) metres.

    Returns mpjpe, pa_mpjpe, pve (N,) and per_joint (N, 14).
    """
    pred14, gt14 = pred_h36m[:, H36M_TO_J14], gt_h36m[:, H36M_TO_J14]
    pred_root, gt_root = pelvis_j14(pred14), pelvis_j14(gt14)
    pred14, gt14 = align_by_root(pred14, pred_root), align_by_root(gt14, gt_root)
    pred_v, gt_v = align_by_root(pred_vertices, pred_root), align_by_root(gt_vertices, gt_root)
    return {
        "mpjpe": 1000 * mpjpe(pred14, gt14),
        "pa_mpjpe": 1000 * pa_mpjpe(pred14, gt14),
        "pve": 1000 * pve(pred_v, gt_v),
        "per_joint": 1000 * per_joint_error(pred14, gt14),
    }


def camera_error(pred_cam_full: torch.Tensor, gt_cam_full: torch.Tensor) -> torch.Tensor:
    """Full-camera translation error in mm. (N, 3) x2 -> (N,)."""
    return 1000 * (pred_cam_full - gt_cam_full).norm(dim=-1)


def camera_depth_error(pred_cam_full: torch.Tensor, gt_cam_full: torch.Tensor) -> torch.Tensor:
    """Depth component of the full-camera error in mm: |tz_pred - tz_true|. (N, 3) x2 -> (N,)."""
    return 1000 * (pred_cam_full[:, 2] - gt_cam_full[:, 2]).abs()


def scale_ratio(pred_cam_full: torch.Tensor, gt_cam_full: torch.Tensor) -> torch.Tensor:
    """Predicted over true crop-camera scale of the same box, s = 2 f / (b tz), so tz_true /
    tz_pred: 1 is unbiased, below 1 places the person too far away. (N, 3) x2 -> (N,)."""
    return gt_cam_full[:, 2] / pred_cam_full[:, 2]


def median_crop_camera(cam_full: torch.Tensor, boxes: torch.Tensor, image_size: torch.Tensor,
                       focal: torch.Tensor) -> torch.Tensor:
    """The constant camera: the per-entry median crop camera (s, tx, ty) of a set of people.
    cam_full, boxes (N, 3), image_size (N, 2), focal (N,) -> (3,)."""
    return cam_full_to_crop(cam_full.double(), boxes.double(), image_size, focal.double()).median(dim=0).values


def _split_cameras(shards: str) -> tuple[torch.Tensor, ...] | None:
    """(cam_full (N, 3), boxes (N, 3), image_size (N, 2), focal (N,)) of every person of a
    shard set with a camera label (no image is decoded); None when there is none."""
    rows = [(s.cam_full, s.box, s.image_size, s.focal)
            for s in ShardReader(shards, shuffle=False, decode_images=False) if s.cam_full is not None]
    if not rows:
        return None
    return tuple(torch.as_tensor(np.stack(column)) for column in zip(*rows))


def split_crop_camera(shards: str) -> list[float]:
    """`median_crop_camera` of a shard set's people (the constant camera of a train split)."""
    cameras = _split_cameras(shards)
    return [] if cameras is None else median_crop_camera(*cameras).tolist()


def split_constant_camera_error(crop_cam: list[float], shards: str) -> float:
    """Mean error (mm) of the constant camera `crop_cam` over a shard set's people (NaN
    without a camera or a labelled person)."""
    cameras = _split_cameras(shards)
    if cameras is None or not crop_cam:
        return float("nan")
    cam_full, boxes, image_size, focal = cameras
    return float(constant_camera_error(crop_cam, cam_full, boxes, image_size, focal).mean())


def constant_camera_error(crop_cam, gt_cam_full: torch.Tensor, boxes: torch.Tensor,
                          image_size: torch.Tensor, focal: torch.Tensor) -> torch.Tensor:
    """Full-camera error (mm) of predicting the crop camera `crop_cam` (3,) for every person:
    the camera baseline a network's `camera_error` is judged against. (N, 3) boxes of RoI 0 -> (N,)."""
    crop = torch.as_tensor(crop_cam, dtype=torch.float64).expand(len(boxes), 3)
    full = cam_crop_to_full(crop, boxes.double(), image_size, focal.double())
    return camera_error(full, gt_cam_full.double())


def roi_camera_spread(cam_full: torch.Tensor) -> torch.Tensor:
    """Disagreement of the RoIs' full cameras in mm: the mean distance of each RoI's
    translation from the RoIs' mean translation. cam_full (N, M, 3) metres -> (N,); 0 for M = 1."""
    centre = cam_full.mean(dim=1, keepdim=True)
    return 1000 * (cam_full - centre).norm(dim=-1).mean(dim=1)


@torch.no_grad()
def predict(model, batch, device):
    """Network output for a batch (eval mode), float32, on `device`."""
    model.eval()
    return model(normalize_images(batch["images"].to(device)), batch["boxes"].to(device),
                 batch["image_size"].to(device), batch["focal"].to(device))


@torch.no_grad()
def evaluate_batch(model, body, batch, device, pred=None):
    """The validation protocol on one batch -> (prediction, per-sample errors).

    errors: mesh_protocol's mpjpe, pa_mpjpe, pve (N,) and per_joint (N, 14) in mm, plus
    cam_err (N,) mm (camera translation of RoI 0), its scale_ratio (N,) and has_cam (N,) bool. Shared by
    `validate` and `raytrain eval` so both report the same numbers. `pred` (vertices,
    joints_h36m, cam_full on `device`) replaces the model's output (oracle checks).
    """
    if pred is None:
        pred = predict(model, batch, device)
    gt = body.forward_axis_angle(batch["pose"].to(device), batch["betas"].to(device),
                                 gender=batch.get("gender"))
    errors = mesh_protocol(pred["joints_h36m"], gt.joints_h36m, pred["vertices"], gt.vertices)
    errors["cam_err"] = camera_error(pred["cam_full"][:, 0], batch["cam_full"].to(device))
    errors["scale_ratio"] = scale_ratio(pred["cam_full"][:, 0], batch["cam_full"].to(device))
    errors["has_cam"] = batch["has_cam"].to(device)
    return pred, errors


@torch.no_grad()
def validate(cfg, model, body, session, device, loader: Loader | None = None) -> dict[str, float]:
    """Mean errors (mm) over this rank's part of the validation set, reduced over ranks.

    ``loader``: this rank's validation ``Loader`` (the training loop keeps one, so that its
    workers serve every validation); None: a loader for this one pass, closed after it.
    Each good sample is scored once; bad ones are skipped and counted (``val_skipped``).
    A data error of one rank's loader stops every rank (``ranks.stop_together``):
    before the first forward pass (under DDP it broadcasts buffers) the ranks agree, and
    later errors are counted in the reduced sums."""
    if loader is None:
        with Loader(cfg, "val", session.rank, session.world_size) as loader:
            return validate(cfg, model, body, session, device, loader)
    sums = torch.zeros(9, dtype=torch.float64, device=device)  # mpjpe, pa, pve, n, cam, n_cam, bad, failed, ratio
    batches, batch, problem = loader.epoch(0), None, None
    try:
        batch = next(batches, None)
    except DataError as error:
        problem = error
    stop_together(problem, device)
    try:
        while batch is not None:
            _, errors = evaluate_batch(model, body, batch, device)
            sums[0] += errors["mpjpe"].sum()
            sums[1] += errors["pa_mpjpe"].sum()
            sums[2] += errors["pve"].sum()
            sums[3] += len(batch["keys"])
            has_cam = errors["has_cam"]
            if has_cam.any():
                sums[4] += errors["cam_err"][has_cam].sum()
                sums[5] += has_cam.sum()
                sums[8] += errors["scale_ratio"][has_cam].sum()
            batch = next(batches, None)
    except DataError as error:
        problem = error
        sums[7] += 1
    sums[6] += sum(loader.bad_counts.values())
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(sums)
    raise_if_stopped(problem, int(sums[7].item()))
    n, n_cam = max(sums[3].item(), 1.0), sums[5].item()
    out = {"val_mpjpe": sums[0].item() / n, "val_pa_mpjpe": sums[1].item() / n,
           "val_pve": sums[2].item() / n, "val_samples": int(sums[3].item()),
           "val_skipped": int(sums[6].item())}
    if n_cam > 0:
        out["val_cam_err"] = sums[4].item() / n_cam
        out["val_scale_ratio"] = sums[8].item() / n_cam
    return out
