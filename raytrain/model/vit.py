"""Plain ViT encoders (timm's VisionTransformer) on the square S×S RoI crops.

    encoder = PooledViT(**VIT_SIZES["vit_base"])      # d = 768
    h = encoder(crops)                                 # (B,3,S,S) -> (B,768)

h_m is the mean of the patch tokens after the final LayerNorm: ViTPose and HMR 2.0 train
their ViT without a class token, so no pretrained token summarises the crop, and the mean
gives every patch of the RoI one share (docs/method.md §3.1).

The position embeddings are held on the 14×14 grid of a 224-pixel crop; a crop of another
size (a multiple of the patch) resamples them to its grid at each forward (timm's
`dynamic_img_size`). `adapt_state` turns the weight layouts people have into timm's names
and that grid before the backbone loader matches them:

* ViTPose (mmpose `backbone.*`) and the backbone of an HMR 2.0 / 4D-Humans checkpoint
  (the same ViT): `last_norm` -> `norm`; `pos_embed` (1, 1 + 16·12, C) whose first row is
  added to every patch (ViTPose's forward adds `pos_embed[:, :1]` to all tokens), resampled
  from the 16×12 grid of 256×192 crops.
* timm's ViT files (`cls_token`, `pos_embed` (1, 1 + 14·14, C), `norm`): the class token
  and its position row stay unused; the patch rows are resampled if the grid differs.
"""
import math

import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer

PATCH = 16
GRID_SIZE = 224  # crop size whose grid (14×14) holds the position embeddings

#: name -> (embed_dim, depth, heads): ViT-Ti/S/B/L as in timm and DeiT, ViT-H/16 as in
#: ViTPose-H and HMR 2.0 (timm's own ViT-H has patch 14).
VIT_SIZES = {
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
    "vit_huge": (1280, 32, 16),
}


class PooledViT(nn.Module):
    """timm's VisionTransformer without class token or head: mean of the normed patch tokens."""

    def __init__(self, embed_dim: int, depth: int, heads: int, drop_path: float = 0.0):
        super().__init__()
        self.net = VisionTransformer(
            img_size=GRID_SIZE, patch_size=PATCH, num_classes=0, embed_dim=embed_dim, depth=depth,
            num_heads=heads, mlp_ratio=4.0, qkv_bias=True, class_token=False, global_pool="avg",
            fc_norm=False, dynamic_img_size=True, drop_path_rate=drop_path)
        self.dim = embed_dim

    @property
    def num_layers(self) -> int:
        return len(self.net.blocks)

    def weights_target(self) -> nn.Module:
        return self.net

    def forward(self, x):  # (B,3,S,S), S a multiple of 16 -> (B,d)
        return self.net(x)

    def layer_id(self, name: str) -> int:
        """Depth of parameter `name` (of self.net) for layer-wise lr decay: 0 for the patch
        and position embeddings, i + 1 for block i, depth + 1 for the final norm."""
        if name.startswith(("patch_embed", "pos_embed")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return self.num_layers + 1


def adapt_state(net: VisionTransformer, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A ViTPose / HMR 2.0 / timm state dict (wrapper prefixes already stripped) in the names
    and position grid of `net` (a PooledViT's), and what was changed; other layouts pass
    unchanged. `net` holds no class token."""
    state, notes = dict(state), []
    vitpose = any(k.startswith("last_norm.") for k in state)
    for suffix in ("weight", "bias"):
        if f"last_norm.{suffix}" in state:
            state[f"norm.{suffix}"] = state.pop(f"last_norm.{suffix}")
    posemb, grid = state.get("pos_embed"), tuple(net.patch_embed.grid_size)
    if posemb is not None and posemb.ndim == 3 and posemb.shape[-1] == net.pos_embed.shape[-1]:
        old = file_grid(posemb.shape[1]) or file_grid(posemb.shape[1] - 1)
        state["pos_embed"] = patch_pos_embed(posemb, grid, vitpose)
        if old and old != grid:
            notes.append(f"position embeddings resized from {old[0]}x{old[1]} to {grid[0]}x{grid[1]}")
    return state, notes


def patch_pos_embed(posemb: torch.Tensor, grid: tuple[int, int], vitpose: bool) -> torch.Tensor:
    """(1, [1 +] h·w, C) position embeddings of a file -> (1, grid_h·grid_w, C), one row per
    patch. A leading class row (an odd extra token) is dropped (timm) or added to every
    patch (ViTPose's forward does that); the h×w grid is resampled bicubically."""
    tokens = posemb.shape[1]
    prefix = 0 if file_grid(tokens) else 1
    old = file_grid(tokens - prefix)
    if old is None:
        return posemb  # no grid recognised: left to the matcher, which reports the shape
    patches = posemb[:, prefix:]
    if prefix and vitpose:
        patches = patches + posemb[:, :1]
    return resample_abs_pos_embed(patches, new_size=list(grid), old_size=list(old), num_prefix_tokens=0)


def file_grid(tokens: int) -> tuple[int, int] | None:
    """The patch grid (rows, cols) of `tokens` position rows: square (ImageNet crops), or
    4:3 portrait as ViTPose's 256×192 (16×12) and 384×288 (24×18) crops."""
    side = math.isqrt(tokens)
    if side * side == tokens and side > 0:
        return side, side
    cols = math.isqrt(tokens * 3 // 4)
    if cols > 0 and tokens % cols == 0 and (tokens // cols) * 3 == cols * 4:
        return tokens // cols, cols
    return None
