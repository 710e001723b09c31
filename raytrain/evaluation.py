"""Evaluation protocols (METHOD.md §7) on top of the pure metrics.

3DPW / H36M protocol: 14 LSP joints regressed from the mesh with the H36M regressor,
both skeletons aligned at the pelvis (mid-hips of the 14), errors in millimetres.
"""
from typing import Dict

import torch

from .body.joints import H36M_TO_J14
from .metrics import align_by_root, mpjpe, pa_mpjpe, per_joint_error, pve

PELVIS_J14 = (2, 3)  # right hip, left hip


def pelvis_j14(joints14: torch.Tensor) -> torch.Tensor:
    """(N, 14, 3) -> (N, 3) mid-hips."""
    return joints14[:, list(PELVIS_J14)].mean(dim=1)


def mesh_protocol(pred_h36m: torch.Tensor, gt_h36m: torch.Tensor, pred_vertices: torch.Tensor,
                  gt_vertices: torch.Tensor) -> Dict[str, torch.Tensor]:
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
