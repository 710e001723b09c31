"""Rotation conversions: axis-angle, rotation matrices and the 6D representation.

The 6D representation (Zhou et al. 2019) is the first two *columns* of the rotation
matrix, stored as (a1, a2) -> (..., 6). All functions broadcast over leading dims.
"""
import torch
import torch.nn.functional as F


def axis_angle_to_rotmat(axis_angle: torch.Tensor) -> torch.Tensor:
    """Rodrigues' formula. axis_angle (..., 3) -> (..., 3, 3)."""
    angle = axis_angle.norm(dim=-1, keepdim=True)                      # (..., 1)
    # Taylor-safe sin(a)/a and (1 - cos a)/a^2 so the zero rotation has a gradient.
    small = angle < 1e-6
    safe = torch.where(small, torch.ones_like(angle), angle)
    sinc = torch.where(small, 1 - angle**2 / 6, torch.sin(safe) / safe)
    cosc = torch.where(small, 0.5 - angle**2 / 24, (1 - torch.cos(safe)) / safe**2)
    K = _skew(axis_angle)                                               # (..., 3, 3)
    eye = torch.eye(3, dtype=axis_angle.dtype, device=axis_angle.device)
    return eye + sinc[..., None] * K + cosc[..., None] * (K @ K)


def rotmat_to_axis_angle(rotmat: torch.Tensor) -> torch.Tensor:
    """Rotation matrices (..., 3, 3) -> axis-angle (..., 3), angle in [0, pi]."""
    quat = rotmat_to_quaternion(rotmat)                                 # (..., 4) w, x, y, z
    quat = torch.where(quat[..., :1] < 0, -quat, quat)                  # w >= 0 -> angle <= pi
    vec = quat[..., 1:]
    sin_half = vec.norm(dim=-1, keepdim=True)
    angle = 2 * torch.atan2(sin_half, quat[..., :1])
    small = sin_half < 1e-8
    scale = torch.where(small, 2 / quat[..., :1].clamp(min=1e-8),
                        angle / torch.where(small, torch.ones_like(sin_half), sin_half))
    return vec * scale


def rotmat_to_quaternion(rotmat: torch.Tensor) -> torch.Tensor:
    """(..., 3, 3) -> unit quaternion (..., 4) as (w, x, y, z); numerically stable branch choice."""
    m = rotmat
    m00, m11, m22 = m[..., 0, 0], m[..., 1, 1], m[..., 2, 2]
    # Four candidate quaternions scaled by 4*q_k; pick the one with the largest |q_k|.
    q_abs = torch.sqrt(torch.clamp(torch.stack([
        1 + m00 + m11 + m22, 1 + m00 - m11 - m22,
        1 - m00 + m11 - m22, 1 - m00 - m11 + m22], dim=-1), min=1e-12))
    candidates = torch.stack([
        torch.stack([q_abs[..., 0] ** 2, m[..., 2, 1] - m[..., 1, 2],
                     m[..., 0, 2] - m[..., 2, 0], m[..., 1, 0] - m[..., 0, 1]], dim=-1),
        torch.stack([m[..., 2, 1] - m[..., 1, 2], q_abs[..., 1] ** 2,
                     m[..., 1, 0] + m[..., 0, 1], m[..., 0, 2] + m[..., 2, 0]], dim=-1),
        torch.stack([m[..., 0, 2] - m[..., 2, 0], m[..., 1, 0] + m[..., 0, 1],
                     q_abs[..., 2] ** 2, m[..., 2, 1] + m[..., 1, 2]], dim=-1),
        torch.stack([m[..., 1, 0] - m[..., 0, 1], m[..., 2, 0] + m[..., 0, 2],
                     m[..., 2, 1] + m[..., 1, 2], q_abs[..., 3] ** 2], dim=-1),
    ], dim=-2)                                                          # (..., 4, 4)
    candidates = candidates / (2 * q_abs[..., None])
    best = q_abs.argmax(dim=-1)                                         # (...)
    quat = torch.gather(candidates, -2, best[..., None, None].expand(*best.shape, 1, 4))[..., 0, :]
    return F.normalize(quat, dim=-1)


def rot6d_to_rotmat(x: torch.Tensor) -> torch.Tensor:
    """6D (..., 6) = two columns (a1, a2) -> rotation matrices (..., 3, 3) by Gram-Schmidt."""
    a1, a2 = x[..., 0:3], x[..., 3:6]
    b1 = F.normalize(a1, dim=-1)
    b2 = F.normalize(a2 - (b1 * a2).sum(-1, keepdim=True) * b1, dim=-1)
    b3 = torch.cross(b1, b2, dim=-1)
    return torch.stack([b1, b2, b3], dim=-1)


def rotmat_to_rot6d(rotmat: torch.Tensor) -> torch.Tensor:
    """(..., 3, 3) -> (..., 6): the first two columns."""
    return torch.cat([rotmat[..., :, 0], rotmat[..., :, 1]], dim=-1)


def _skew(v: torch.Tensor) -> torch.Tensor:
    """(..., 3) -> cross-product matrices (..., 3, 3)."""
    zero = torch.zeros_like(v[..., 0])
    x, y, z = v[..., 0], v[..., 1], v[..., 2]
    return torch.stack([
        torch.stack([zero, -z, y], dim=-1),
        torch.stack([z, zero, -x], dim=-1),
        torch.stack([-y, x, zero], dim=-1),
    ], dim=-2)
