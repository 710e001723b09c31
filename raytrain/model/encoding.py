"""Positional encoding of RoI boxes (docs/method.md §3.2).

    γ(p) = (p, sin(2^0 πp), cos(2^0 πp), ..., sin(2^L πp), cos(2^L πp))

applied to each of the three variables of the CLIFF-normalised box (bbox_info, so p is
O(1)), and the three encodings concatenated: a box gives 3 * (2L + 3) numbers (201 for
the paper's L = 32).

Precision. With |p| ~ 1 the argument 2^k πp needs k + 2 bits left of the binary point;
float32 keeps 24 significant bits, so in float32 the argument's rounding error reaches
~1 rad near k ≈ 22 and every band above is noise. We therefore compute bbox_info and the
encoding in float64 (53 bits: the argument is exact to ~2e-6 rad even at k = 32) and only
cast the finished values, which lie in [-1, 1], to the model dtype. Note what the high
bands still mean: a box coordinate stored in float32 pixels is itself only known to
~1e-7 in p, so for k ≳ 20 the bands are a deterministic but hash-like function of the box
(identical boxes give identical codes and γ(B_m) - γ(B_m) = 0 exactly; a sub-pixel shift
scrambles them). They carry no smooth geometry; `num_bands` (L) is configurable for that
reason (the paper's Table 3 found L = 32 best).
"""
import math

import torch

from raytrain.geometry import bbox_info


def encoding_dim(num_bands: int = 32, num_vars: int = 3) -> int:
    """Length of the encoding of `num_vars` scalars with bands 2^0 ... 2^L."""
    return num_vars * (2 * (num_bands + 1) + 1)


def positional_encoding(p: torch.Tensor, num_bands: int = 32, dtype=None) -> torch.Tensor:
    """γ per scalar. p (..., K) -> (..., K * (2L + 3)), computed in float64, returned in `dtype`.

    Per variable the layout is (p, sin f0 p, cos f0 p, sin f1 p, cos f1 p, ...), f_k = 2^k π.
    """
    if num_bands < 0:
        raise ValueError(f"num_bands must be >= 0, got {num_bands}")
    dtype = dtype or (p.dtype if p.is_floating_point() else torch.get_default_dtype())
    p64 = p.to(torch.float64)
    freqs = (2.0 ** torch.arange(num_bands + 1, dtype=torch.float64, device=p.device)) * math.pi
    angles = p64[..., None] * freqs                                       # (..., K, L+1)
    bands = torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(-2)  # (..., K, 2L+2)
    enc = torch.cat([p64[..., None], bands], dim=-1)                      # (..., K, 2L+3)
    return enc.flatten(-2).to(dtype)


def box_encoding(boxes: torch.Tensor, image_size: torch.Tensor, focal: torch.Tensor,
                 num_bands: int = 32, dtype=None):
    """γ(bbox_info(B)) for every RoI, in float64 end to end.

    boxes (N,M,3) full-image px, image_size (N,2) as (W,H), focal (N,)
    -> (pe (N,M,3(2L+3)), info (N,M,3)), both in `dtype` (default: float32 or boxes' float dtype).
    """
    dtype = dtype or (boxes.dtype if boxes.is_floating_point() else torch.get_default_dtype())
    info = bbox_info(boxes.to(torch.float64), image_size[:, None].to(torch.float64),
                     focal[:, None].to(torch.float64))                    # (N,M,3) float64
    return positional_encoding(info, num_bands, dtype=dtype), info.to(dtype)
