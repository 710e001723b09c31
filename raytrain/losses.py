"""Losses (docs/method.md §6): camera consistency, contrastive, and SPIN-style supervision.

Pure functions on tensors; `compute_losses` weighs them and returns every term for logging.
"""
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .geometry import axis_angle_to_rotmat, cam_crop_to_full, perspective_projection, to_roi_coords

MIN_DEPTH = 0.1      # metres: joints closer than this to the camera plane are clamped
PELVIS_J24 = (2, 3)  # pelvis for 3D alignment = mid-hips of the J24 set (SPIN convention)


def camera_consistency_loss(cam: torch.Tensor, boxes: torch.Tensor, image_size: torch.Tensor,
                            focal: torch.Tensor, weights: Sequence[float] = (0.1, 0.1, 1e-4)
                            ) -> torch.Tensor:
    """L_cam: every RoI's full camera should agree (docs/method.md §6).

    cam (N, M, 3) crop cameras (s, tx, ty); boxes (N, M, 3); image_size (N, 2); focal (N,).
    Sum over ordered pairs m != n of weighted squared differences of (X, Y, S) with
    X = tx_full, Y = ty_full, S = b_m s_m; mean over persons. Scalar.
    """
    full = cam_crop_to_full(cam, boxes, image_size[:, None, :], focal[:, None])
    scale = boxes[..., 2] * cam[..., 0]                                  # (N, M)
    terms = torch.stack([full[..., 0], full[..., 1], scale], dim=-1)    # (N, M, 3)
    diff = terms[:, :, None, :] - terms[:, None, :, :]                   # (N, M, M, 3)
    w = torch.as_tensor(weights, dtype=cam.dtype, device=cam.device)
    return (diff ** 2 * w).sum(dim=(1, 2, 3)).mean()


def contrastive_loss(z: torch.Tensor, tau: float = 0.5,
                     extra_negatives: torch.Tensor | None = None) -> torch.Tensor:
    """L_cont: RoIs of one person attract, RoIs of other persons repel (docs/method.md §6).

    z (N, M, D) projections (L2-normalised here). The denominator holds negatives only:
    all RoIs of the other persons in the batch, plus `extra_negatives` (K, D), e.g. the
    projections gathered from other DDP workers. Scalar, mean over persons.
    """
    n, m, _ = z.shape
    num_extra = 0 if extra_negatives is None else extra_negatives.shape[0]
    if m < 2:
        raise ValueError(f"contrastive loss needs at least 2 RoIs per person, got M={m}")
    if n < 2 and num_extra == 0:
        raise ValueError(f"contrastive loss needs at least 2 persons per batch, got N={n}")
    anchors = F.normalize(z, dim=-1).reshape(n * m, -1)                 # (NM, D)
    person = torch.arange(n, device=z.device).repeat_interleave(m)      # (NM,)
    sim = anchors @ anchors.T / tau                                     # (NM, NM)
    same = person[:, None] == person[None, :]
    neg_sim = sim.masked_fill(same, float("-inf"))
    if num_extra:
        extra = F.normalize(extra_negatives.to(z.dtype), dim=-1)
        neg_sim = torch.cat([neg_sim, anchors @ extra.T / tau], dim=1)
    log_den = torch.logsumexp(neg_sim, dim=1, keepdim=True)             # (NM, 1)
    positive = same & ~torch.eye(n * m, dtype=torch.bool, device=z.device)
    log_ratio = (sim - log_den).masked_fill(~positive, 0.0)
    return -log_ratio.sum() / (m - 1) / n


def gather_negatives(z: torch.Tensor) -> torch.Tensor | None:
    """Projections (K, D) of the other DDP ranks' persons (no gradient), or None off DDP."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    flat = F.normalize(z.detach(), dim=-1).reshape(-1, z.shape[-1]).contiguous()
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    rank = dist.get_rank()
    return torch.cat([g for r, g in enumerate(gathered) if r != rank], dim=0)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of per-sample values (N, ...) over samples where mask (N,) is true; 0 if none."""
    mask = mask.to(values.dtype).reshape(-1, *([1] * (values.dim() - 1)))
    count = mask.sum() * values[0].numel()
    return (values * mask).sum() / count.clamp(min=1.0)


def smpl_losses(pose_rotmat, betas, gt_pose, gt_betas, has_smpl):
    """SPIN's parameter losses. pose_rotmat (N, 24, 3, 3); gt_pose (N, 72) axis-angle."""
    gt_rotmat = axis_angle_to_rotmat(gt_pose.reshape(-1, 24, 3))
    pose = masked_mean((pose_rotmat - gt_rotmat) ** 2, has_smpl)
    shape = masked_mean((betas - gt_betas) ** 2, has_smpl)
    return pose, shape


def vertex_loss(vertices, gt_vertices, has_smpl):
    """L1 on vertices (N, V, 3) where ground-truth SMPL exists [choice: L1 as in SPIN's code]."""
    return masked_mean((vertices - gt_vertices).abs(), has_smpl)


def joints_3d_loss(joints, gt_joints, has_3d, pelvis=PELVIS_J24):
    """Pelvis-aligned squared L2 on 3D joints. joints (N, J, 3); gt_joints (N, J, 4) with conf."""
    conf = gt_joints[..., 3:]
    pred = joints - joints[:, list(pelvis)].mean(dim=1, keepdim=True)
    gt = gt_joints[..., :3] - gt_joints[:, list(pelvis), :3].mean(dim=1, keepdim=True)
    return masked_mean(conf * (pred - gt) ** 2, has_3d)


def keypoints_2d_loss(joints, cam_full, boxes, image_size, focal, gt_keypoints, has_2d):
    """L_2D summed over RoIs: joints projected with RoI m's full camera, compared in RoI m's
    normalised coordinates. joints (N, J, 3); cam_full, boxes (N, M, 3); gt (N, J, 3)."""
    pixels = perspective_projection(joints[:, None], cam_full, focal[:, None],
                                    image_size[:, None, :], eps=MIN_DEPTH)  # (N, M, J, 2)
    pred = to_roi_coords(pixels, boxes)
    gt = to_roi_coords(gt_keypoints[:, None, :, :2].expand_as(pixels), boxes)
    conf = gt_keypoints[:, None, :, 2:]
    per_roi = conf * (pred - gt) ** 2                                   # (N, M, J, 2)
    return masked_mean(per_roi.sum(dim=1), has_2d)


def contrastive_warmup(step: int, warmup_steps: int) -> float:
    """Factor on lambda_cont at optimisation step `step` (0-based): a linear ramp from
    1/warmup_steps to 1 over the first `warmup_steps` steps, then 1 (0 steps: always 1)."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / warmup_steps)


def compute_losses(pred: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], weights,
                   gt_vertices: torch.Tensor | None = None,
                   extra_negatives: torch.Tensor | None = None, cont_factor: float = 1.0):
    """Weighted total and every term. `weights` has lambda_cam, lambda_cont, lambda_pose,
    lambda_betas, lambda_vert, lambda_3d, lambda_2d, cam_weights (3), tau; `cont_factor`
    multiplies lambda_cont (its warm-up, `contrastive_warmup`).

    pred: the network's output dict; batch: the training batch (CONVENTIONS.md).
    Returns (total scalar, {term: detached scalar}).
    """
    has_smpl, has_3d, has_2d = batch["has_smpl"], batch["has_3d"], batch["has_2d"]
    terms = {}
    terms["cam"] = camera_consistency_loss(pred["cam_crop"], batch["boxes"], batch["image_size"],
                                           batch["focal"], weights.cam_weights)
    m = pred["z"].shape[1]
    if weights.lambda_cont > 0 and m >= 2:
        terms["cont"] = contrastive_loss(pred["z"], weights.tau, extra_negatives)
    else:  # keep the projection head in the graph: DDP runs without find_unused_parameters
        terms["cont"] = 0.0 * pred["z"].sum()
    terms["pose"], terms["betas"] = smpl_losses(pred["pose_rotmat"], pred["betas"], batch["pose"],
                                                batch["betas"], has_smpl)
    if gt_vertices is not None and "vertices" in pred:
        terms["vert"] = vertex_loss(pred["vertices"], gt_vertices, has_smpl)
    if "joints" in pred:
        terms["3d"] = joints_3d_loss(pred["joints"], batch["joints_3d"], has_3d)
        terms["2d"] = keypoints_2d_loss(pred["joints"], pred["cam_full"], batch["boxes"],
                                        batch["image_size"], batch["focal"],
                                        batch["keypoints_2d"], has_2d)
    scale = {"cam": weights.lambda_cam, "cont": weights.lambda_cont * cont_factor, "pose": weights.lambda_pose,
             "betas": weights.lambda_betas, "vert": weights.lambda_vert, "3d": weights.lambda_3d,
             "2d": weights.lambda_2d}
    total = sum(scale[k] * v for k, v in terms.items())
    return total, {k: v.detach() for k, v in terms.items()}
