"""HMR/SPIN/CLIFF-style iterative regressors (METHOD.md §3.5) and the contrastive head.

    D_mesh(ū ⊕ extra) -> θ (N,24,6) in 6D, β (N,10)      from the mean pose / shape
    D_cam(u_m ⊕ extra) -> C_m = (s, tx, ty)              from the mean camera

Each iteration feeds the features and the current estimate through two FC layers (ReLU,
dropout) and adds a residual update: y <- y + head([x, y]). The update head starts near
zero (Xavier, gain 0.01, as in SPIN) so the first forward pass returns ≈ the mean.
"""
import torch
import torch.nn as nn

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

    def forward(self, x: Tensor) -> Tensor:
        """x (..., in_dim) -> (..., 3); all leading dims are treated as a batch."""
        lead = x.shape[:-1]
        state = self.net(x.reshape(-1, x.shape[-1]), self.mean)
        scale = torch.exp(state[:, :1].clamp(*self.LOG_S_RANGE))
        return torch.cat([scale, state[:, 1:]], dim=-1).reshape(*lead, 3)


class ProjectionHead(nn.Module):
    """Contrastive projection z = P(h): Linear-ReLU-Linear (METHOD.md §3.6). Not normalised;
    the contrastive loss L2-normalises z."""

    def __init__(self, in_dim: int, out_dim: int = 128, hidden: int = 0):
        super().__init__()
        hidden = hidden or in_dim  # SimCLR-style: hidden width = feature width
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, out_dim))

    def forward(self, h: Tensor) -> Tensor:  # (..., d) -> (..., D)
        return self.net(h)
