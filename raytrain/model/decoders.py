"""HMR/SPIN/CLIFF-style iterative regressors (docs/method.md §3.5) and the contrastive head.

    D_mesh(ū ⊕ extra) -> θ (N,24,6) in 6D, β (N,10)      from the mean pose / shape
    D_cam(u_m ⊕ extra) -> C_m = (s, tx, ty)              from the mean camera, or from one
                                                         full camera shared by the M RoIs

Each iteration feeds the features and the current estimate through two FC layers (ReLU,
dropout) and adds a residual update: y <- y + head([x, y]). The update head starts near
zero (Xavier, gain 0.01, as in SPIN) so the first forward pass returns ≈ the mean.
"""
import torch
import torch.nn as nn

from raytrain.geometry import cam_crop_to_full, cam_full_to_crop

Tensor = torch.Tensor


class IterativeRegressor(nn.Module):
    """y_{t+1} = y_t + head(FC(FC([x, y_t]))), t = 0..iters-1, y_0 = init."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 1024, iters: int = 3,
                 dropout: float = 0.5):
        super().__init__()
        if iters < 1:
            raise ValueError(f"decoder iterations must be >= 1, got {iters}")
        self.iters = iters
        self.mlp = nn.Sequential(
            nn.Linear(in_dim + out_dim, hidden), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout),
        )
        self.head = nn.Linear(hidden, out_dim)
        nn.init.xavier_uniform_(self.head.weight, gain=0.01)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: Tensor, init: Tensor) -> Tensor:
        """x (B,in_dim), init (out_dim,) or (B,out_dim) -> (B,out_dim).

        The estimate y stays in init's dtype (float32 under autocast) and only the update
        goes through the reduced-precision layers.
        """
        y = init.expand(x.shape[0], -1)
        for _ in range(self.iters):
            y = y + self.head(self.mlp(torch.cat([x, y], dim=-1)))
        return y


class MeshDecoder(nn.Module):
    """D_mesh: shared feature -> pose (N,24,6) and shape (N,10), refined from the mean."""

    def __init__(self, in_dim: int, mean_pose: Tensor, mean_shape: Tensor, **kwargs):
        super().__init__()
        self.register_buffer("mean", torch.cat([mean_pose.flatten(), mean_shape.flatten()]).float())
        self.num_pose = mean_pose.numel()
        self.net = IterativeRegressor(in_dim, self.mean.numel(), **kwargs)

    def forward(self, x: Tensor):
        y = self.net(x, self.mean)                                # (N,144+10)
        pose = y[:, :self.num_pose].reshape(x.shape[0], -1, 6)    # (N,24,6)
        return pose, y[:, self.num_pose:]                         # (N,24,6), (N,10)


class CameraDecoder(nn.Module):
    """D_cam: per-RoI feature -> weak-perspective crop camera (s, tx, ty), refined from the mean.

    The regressor refines (log s, tx, ty) [choice]: s = exp(.) stays positive, so the full
    camera's tz = 2f / (b s) never crosses zero; log s is clamped to [-4, 3]. A raw s that
    wanders through 0 early in training sends L_cam and the reprojection to infinity.
    """
    LOG_S_RANGE = (-4.0, 3.0)

    def __init__(self, in_dim: int, mean_cam: Tensor, **kwargs):
        super().__init__()
        mean = mean_cam.flatten().float().clone()
        mean[0] = torch.log(mean[0].clamp(min=1e-3))
        self.register_buffer("mean", mean)
        self.net = IterativeRegressor(in_dim, 3, **kwargs)

    def consistent_start(self, boxes: Tensor, image_size: Tensor, focal: Tensor) -> Tensor:
        """(N, M, 3) starting states (log s, tx, ty): the mean crop camera placed in the
        RoIs' mean box, carried to every RoI m through the full camera it implies, so that
        all RoIs start with one full camera (L_cam = 0), whatever the RoIs' order.
        boxes (N, M, 3); image_size (N, 2); focal (N,)."""
        n, m = boxes.shape[:2]
        dtype = self.mean.dtype
        boxes = boxes.to(dtype)
        size = image_size.to(dtype)[:, None].expand(n, m, 2)
        focal = focal.to(dtype)[:, None].expand(n, m)
        start = torch.cat([self.mean[:1].exp(), self.mean[1:]]).expand(n, 1, 3)
        mean_box = boxes.mean(dim=1, keepdim=True)                                 # (N, 1, 3)
        full = cam_crop_to_full(start, mean_box, size[:, :1], focal[:, :1])       # (N, 1, 3)
        crop = cam_full_to_crop(full.expand(n, m, 3), boxes, size, focal)         # (N, M, 3)
        return torch.cat([crop[..., :1].log(), crop[..., 1:]], dim=-1)

    def forward(self, x: Tensor, start: Tensor | None = None) -> Tensor:
        """x (..., in_dim) -> (..., 3); all leading dims are treated as a batch. start:
        optional (..., 3) starting states (log s, tx, ty) instead of the mean camera."""
        lead = x.shape[:-1]
        init = self.mean if start is None else start.reshape(-1, 3)
        state = self.net(x.reshape(-1, x.shape[-1]), init)
        scale = torch.exp(state[:, :1].clamp(*self.LOG_S_RANGE))
        return torch.cat([scale, state[:, 1:]], dim=-1).reshape(*lead, 3)


class ProjectionHead(nn.Module):
    """Contrastive projection z = P(h): Linear-ReLU-Linear (docs/method.md §3.6). Not normalised;
    the contrastive loss L2-normalises z."""

    def __init__(self, in_dim: int, out_dim: int = 128, hidden: int = 0):
        super().__init__()
        hidden = hidden or in_dim  # SimCLR-style: hidden width = feature width
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, out_dim))

    def forward(self, h: Tensor) -> Tensor:  # (..., d) -> (..., D)
        return self.net(h)
