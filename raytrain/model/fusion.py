"""RoI fusion (docs/method.md §3.3-3.4) and the ablation variants, as a registry.

Every variant maps per-RoI features h (N,M,d) and box encodings γ(B) (N,M,P) to fused
features u (N,M,d) and fusion weights w (N,M,M) with w[:, m, :] summing to 1 over n.
None of them uses the RoI index, so permuting the RoIs permutes u and w accordingly.

    name            weights w_mn                                         u_m
    none            identity (δ_mn)                                      h_m
    h_null          softmax_n score(h_n)                                 Σ_n w_mn h_n
    abs_pe          softmax_n score(h_n ⊕ γ(B_n))                        Σ_n w_mn h_n
    raf (default)   softmax_n score(h_n ⊕ (γ(B_m) - γ(B_n)))             Σ_n w_mn h_n
    self_attention  softmax_n q_m·k_n/√d_h over tokens h ⊕ γ(B), head-mean    proj(Σ_n att v_n)

`score` is the paper's single Linear layer to a scalar (hidden = 0), or a 2-layer MLP
(hidden > 0). Note on the paper's Linear: Linear(h_n ⊕ (γ_m - γ_n)) = a·h_n - b·γ_n + b·γ_m + c,
and the term b·γ_m is the same for every n, so the softmax over n removes it: with a
linear score the RAF weights do not depend on m (every u_m is equal) and RAF spans the
same functions as abs_pe. Only a non-linear score (hidden > 0) makes the relative
encoding matter. The same holds for h_null and abs_pe with any score: nothing depends on m.
"""
import math

import torch
import torch.nn as nn

from ..registry import Registry

Tensor = torch.Tensor
#: name -> `Fusion` subclass.
FUSIONS = Registry("fusion")


def list_fusions() -> list[str]:
    return FUSIONS.names()


def create_fusion(name: str, dim: int, pe_dim: int, hidden: int = 0, heads: int = 8) -> "Fusion":
    """Build fusion `name` for features of size `dim` and box encodings of size `pe_dim`."""
    return FUSIONS.get(name)(dim, pe_dim, hidden=hidden, heads=heads)


class Fusion(nn.Module):

    def forward(self, h: Tensor, pe: Tensor) -> tuple[Tensor, Tensor]:
        """h (N,M,d), pe (N,M,P) -> u (N,M,d), w (N,M,M)."""
        raise NotImplementedError


@FUSIONS.register("none")
class NoFusion(Fusion):
    """u_m = h_m; the weights are the identity."""

    def __init__(self, dim: int, pe_dim: int, **_):
        super().__init__()

    def forward(self, h, pe):
        N, M, _ = h.shape
        w = torch.eye(M, dtype=h.dtype, device=h.device).expand(N, M, M)
        return h, w


def _scorer(in_dim: int, hidden: int) -> nn.Module:
    if hidden <= 0:
        return nn.Linear(in_dim, 1)  # the paper's Linear(F_mn) -> scalar
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))


class ScoredFusion(Fusion):
    """w_mn = softmax over n of score(F_mn); u_m = Σ_n w_mn h_n. Subclasses define F_mn."""

    uses_pe = True

    def __init__(self, dim: int, pe_dim: int, hidden: int = 0, **_):
        super().__init__()
        self.score = _scorer(dim + (pe_dim if self.uses_pe else 0), hidden)

    def pair_features(self, h: Tensor, pe: Tensor) -> Tensor:
        """-> F (N,M,M,·), indexed [batch, m, n]."""
        raise NotImplementedError

    def forward(self, h, pe):
        logits = self.score(self.pair_features(h, pe)).squeeze(-1)  # (N,M,M)
        w = logits.softmax(dim=-1)                                   # sums to 1 over n
        u = w @ h                                                    # (N,M,M) @ (N,M,d) -> (N,M,d)
        return u, w


def _over_m(x: Tensor) -> Tensor:
    """Per-n tensor (N,M,C) -> (N,M,M,C) constant over the m axis."""
    N, M, C = x.shape
    return x[:, None].expand(N, M, M, C)


@FUSIONS.register("h_null")
class HNullFusion(ScoredFusion):
    """F_mn = h_n ⊕ NULL (features only)."""

    uses_pe = False

    def pair_features(self, h, pe):
        return _over_m(h)


@FUSIONS.register("abs_pe")
class AbsolutePEFusion(ScoredFusion):
    """F_mn = h_n ⊕ γ(B_n)."""

    def pair_features(self, h, pe):
        return _over_m(torch.cat([h, pe], dim=-1))


@FUSIONS.register("raf")
class RoIAwareFusion(ScoredFusion):
    """RAF: F_mn = h_n ⊕ γ_mn with γ_mn = γ(B_m) - γ(B_n)."""

    def pair_features(self, h, pe):
        rel = pe[:, :, None] - pe[:, None, :]  # (N,M,M,P): [b, m, n] = γ_m - γ_n
        return torch.cat([_over_m(h), rel], dim=-1)


@FUSIONS.register("self_attention")
class SelfAttentionFusion(Fusion):
    """Multi-head self-attention over the M tokens h_m ⊕ γ(B_m), output projected to d.

    Weights returned are the attention probabilities averaged over heads (rows sum to 1).
    """

    def __init__(self, dim: int, pe_dim: int, heads: int = 8, **_):
        super().__init__()
        self.heads = heads if dim % heads == 0 else 1
        self.qkv = nn.Linear(dim + pe_dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, h, pe):
        N, M, d = h.shape
        H = self.heads
        qkv = self.qkv(torch.cat([h, pe], dim=-1))                  # (N,M,3d)
        q, k, v = qkv.view(N, M, 3, H, d // H).permute(2, 0, 3, 1, 4)  # each (N,H,M,d/H)
        att = (q @ k.transpose(-1, -2) / math.sqrt(d // H)).softmax(dim=-1)  # (N,H,M,M)
        y = (att @ v).transpose(1, 2).reshape(N, M, d)              # (N,M,d)
        return self.proj(y), att.mean(dim=1)
