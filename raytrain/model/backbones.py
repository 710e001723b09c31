"""Backbone registry: the shared encoder E that maps one RoI crop to a feature h in R^d.

Every entry is a small builder returning `(module, d)` where `module(x (B,3,S,S)) -> (B,d)`.
Models come from timm with `pretrained=False` (no network access); weights are loaded
from a local checkpoint file when one is given.

    backbone, d = create_backbone("resnet50")                   # d = 2048
    backbone, d = create_backbone("hrnet_w48", "pose_hrnet.pth")  # d = 720
"""
import logging
import os

import timm
import torch
import torch.nn as nn

from ..registry import Registry

log = logging.getLogger(__name__)

#: name -> builder `() -> (module, feature_dim)`.
BACKBONES = Registry("backbone")


def list_backbones() -> list[str]:
    return BACKBONES.names()


def create_backbone(name: str, checkpoint: str | None = None) -> tuple[nn.Module, int]:
    """Build the backbone `name`; load weights from the local file `checkpoint` if given."""
    builder = BACKBONES.get(name)
    if checkpoint is not None and not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"backbone checkpoint not found: {checkpoint}")
    module, dim = builder()
    if checkpoint is not None:
        load_backbone_weights(module.weights_target(), checkpoint)
    return module, dim


# -----------------------------------------------------------------------------
# wrappers

class PooledTimm(nn.Module):
    """A timm classifier with its classifier removed: globally average-pooled features."""

    def __init__(self, name: str, **kwargs):
        super().__init__()
        self.net = timm.create_model(name, pretrained=False, num_classes=0, global_pool="avg", **kwargs)
        # head_hidden_size covers nets with a conv head after pooling (MobileNetV3: 1024).
        self.dim = getattr(self.net, "head_hidden_size", None) or self.net.num_features

    def weights_target(self) -> nn.Module:
        return self.net

    def forward(self, x):  # (B,3,S,S) -> (B,d)
        return self.net(x)


class HRNetBranches(nn.Module):
    """HRNet: the four final-stage branches, each globally average-pooled, concatenated.

    How d = 720 comes out of timm: `timm.create_model("hrnet_w48", features_only=True)` by
    default returns 5 maps with 64/128/256/512/1024 channels, because its default
    `feature_location="incre"` passes the branches through the classification head's
    channel-increase bottlenecks. With `feature_location=""` the maps are the raw HRNet
    outputs: index 0 is the stride-2 stem (64 ch), indices 1..4 are the four branches of
    stage 4 at strides 4/8/16/32 with 48/96/192/384 channels (W48 = 48 * 2^k). We take
    `out_indices=(1, 2, 3, 4)`, average-pool each branch over space and concatenate:
    48 + 96 + 192 + 384 = 720. (The HRNet pose "concat" head upsamples the branches to the
    stride-4 grid before concatenating; global average pooling of a nearest-upsampled map
    equals pooling the original, so this is the same feature up to the interpolation.)
    The incre/classifier layers are never built, so DDP sees no unused parameters.
    """

    def __init__(self, name: str):
        super().__init__()
        self.net = timm.create_model(name, pretrained=False, features_only=True,
                                     feature_location="", out_indices=(1, 2, 3, 4))
        self.dim = sum(self.net.feature_info.channels())

    def weights_target(self) -> nn.Module:
        return self.net

    def forward(self, x):  # (B,3,S,S) -> (B,d)
        return torch.cat([f.mean(dim=(2, 3)) for f in self.net(x)], dim=1)


def _pooled(name: str, **kwargs) -> tuple[nn.Module, int]:
    module = PooledTimm(name, **kwargs)
    return module, module.dim


# -----------------------------------------------------------------------------
# registry entries

@BACKBONES.register("resnet50")
def resnet50():  # the paper's R50, d = 2048
    return _pooled("resnet50")


@BACKBONES.register("hrnet_w48")
def hrnet_w48():  # the paper's H48, d = 720
    module = HRNetBranches("hrnet_w48")
    return module, module.dim


@BACKBONES.register("hrnet_w32")
def hrnet_w32():  # d = 32 + 64 + 128 + 256 = 480
    module = HRNetBranches("hrnet_w32")
    return module, module.dim


@BACKBONES.register("resnet18")
def resnet18():  # CPU flavour, d = 512, 11.2 M params
    return _pooled("resnet18")


@BACKBONES.register("resnet10t")
def resnet10t():  # CPU flavour, d = 512, 4.9 M params (tiered stem); demo default
    return _pooled("resnet10t")


@BACKBONES.register("mobilenetv3_small_050")
def mobilenetv3_small_050():  # fastest on CPU, d = 1024 (after its conv head), 0.57 M params
    return _pooled("mobilenetv3_small_050")


# -----------------------------------------------------------------------------
# checkpoints

_PREFIXES = ("module.", "backbone.", "encoder.", "model.", "net.")


def _unwrap_state_dict(obj) -> dict[str, torch.Tensor]:
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ValueError(f"expected a state dict, got {type(obj).__name__}")
    out = {}
    for key, value in obj.items():
        changed = True
        while changed:  # strip wrapper prefixes such as "module.backbone."
            changed = False
            for prefix in _PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    return out


def load_backbone_weights(module: nn.Module, path: str) -> None:
    """Load matching tensors from a local checkpoint (timm/torchvision/pose-HRNet layouts).

    Keys are matched by name after stripping wrapper prefixes; tensors whose shape differs
    (a classifier or pose head) are skipped. Fails when nothing at all matches.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"backbone checkpoint not found: {path}")
    try:
        state = _unwrap_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as e:  # unpickling refused, truncated file, wrong format
        raise ValueError(f"cannot read backbone checkpoint {path}: {e}") from e
    own = module.state_dict()
    matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not matched:
        raise ValueError(f"backbone checkpoint {path} has no tensor matching the model "
                         f"(e.g. model key {next(iter(own))!r})")
    module.load_state_dict(matched, strict=False)
    missing = len(own) - len(matched)
    log.info("loaded %d/%d backbone tensors from %s (%d left at init)", len(matched), len(own), path, missing)
