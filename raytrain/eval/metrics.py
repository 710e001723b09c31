"""Evaluation metrics: MPJPE, PA-MPJPE (similarity Procrustes), PVE.

Pure functions: pred, gt (N, J, 3) -> (N,) in the input units (multiply metres by 1000
for mm). Alignment (pelvis, Procrustes) is explicit so protocols stay visible.
"""
import torch


def mpjpe(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Mean per-joint position error. (N, J, 3) x2 -> (N,)."""
    return (pred - gt).norm(dim=-1).mean(dim=-1)


def pve(pred_vertices: torch.Tensor, gt_vertices: torch.Tensor) -> torch.Tensor:
    """Per-vertex error: the MPJPE formula over mesh vertices. (N, V, 3) x2 -> (N,)."""
    return mpjpe(pred_vertices, gt_vertices)


def pa_mpjpe(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """MPJPE after the similarity transform (s, R, t) that best maps pred onto gt."""
    return mpjpe(procrustes_align(pred, gt), gt)


def per_joint_error(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """(N, J, 3) x2 -> (N, J) Euclidean error of each joint."""
    return (pred - gt).norm(dim=-1)


def align_by_root(points: torch.Tensor, root: torch.Tensor) -> torch.Tensor:
    """Subtract a root position. points (N, J, 3), root (N, 3) -> (N, J, 3)."""
    return points - root[:, None, :]


def procrustes_align(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Similarity Procrustes (Umeyama): s R pred + t closest to gt in least squares.

    pred, gt (N, J, 3) -> aligned pred (N, J, 3). Computed in float64 for stability.
    """
    dtype = pred.dtype
    x, y = pred.double(), gt.double()
    mu_x, mu_y = x.mean(dim=1, keepdim=True), y.mean(dim=1, keepdim=True)
    x0, y0 = x - mu_x, y - mu_y
    var_x = (x0 ** 2).sum(dim=(1, 2))                                   # (N,)
    cov = x0.transpose(1, 2) @ y0                                       # (N, 3, 3)
    u, sigma, vh = torch.linalg.svd(cov)
    # Reflection guard: flip the last singular vector when det(V U^T) < 0.
    d = torch.sign(torch.linalg.det(vh.transpose(1, 2) @ u.transpose(1, 2)))
    d = torch.where(d == 0, torch.ones_like(d), d)
    fix = torch.ones_like(sigma)
    fix[:, -1] = d
    rot = vh.transpose(1, 2) @ torch.diag_embed(fix) @ u.transpose(1, 2)  # (N, 3, 3)
    scale = (sigma * fix).sum(dim=1) / var_x.clamp(min=1e-12)
    aligned = scale[:, None, None] * x0 @ rot.transpose(1, 2) + mu_y
    return aligned.to(dtype)
