"""Backbone registry: the shared encoder E that maps one RoI crop to a feature h in R^d.

Every entry is a small builder `fn(pretrained: bool) -> (module, d)` where
`module(x (B,3,S,S)) -> (B,d)`. Weights come from a local checkpoint file
(`model.backbone_checkpoint`: the HRNet pose repository's `pose_hrnet_w48_*.pth`,
SimpleBaseline's `pose_resnet_50_*.pth`, timm or torchvision ImageNet files, `.pth` or
`.safetensors`), or from timm's own hub loading (`model.pretrained=imagenet`, needs the
network or a filled Hugging Face cache).

    backbone, d = create_backbone("resnet50")                           # d = 2048, random init
    backbone, d = create_backbone("hrnet_w48", "pose_hrnet_w48_256x192.pth")  # d = 720

The ViTs (`vit_tiny` ... `vit_huge`, model/vit.py) also take ViTPose's and HMR 2.0's files and
timm's ViT files. Any other timm model is reachable as `timm:<name>` (`timm:convnext_tiny`):
globally average-pooled, random init, timm's ImageNet hub weights or a timm-layout file.

A checkpoint load prints `matched/total` backbone tensors always, warns below 98 % and
refuses below 90 % (naming what did not match) unless `partial_ok` (`model.backbone_partial_ok`);
a file whose tensors are not all finite is refused.
"""
import logging
import os
import pickle
import stat
import zipfile
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

import timm
import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

from ..registry import Registry
from .vit import PATCH, VIT_SIZES, PooledViT, adapt_state

log = logging.getLogger(__name__)

TIMM_PREFIX = "timm:"


class BackboneRegistry(Registry):
    """The registered backbones, and any timm CNN as `timm:<name>` (asked of timm)."""

    def get(self, name: str):
        if isinstance(name, str) and name.startswith(TIMM_PREFIX):
            problem = self.problem(name)
            if problem:
                raise ValueError(f"backbone {problem}")
            return lambda pretrained=False: _pooled(name[len(TIMM_PREFIX):], pretrained)
        return super().get(name)

    def problem(self, name) -> str | None:
        if not (isinstance(name, str) and name.startswith(TIMM_PREFIX)):
            return super().problem(name)
        timm_name = name[len(TIMM_PREFIX):]
        if not timm.is_model(timm_name):
            return (f"{name!r}: timm {timm.__version__} has no model {timm_name!r} "
                    f"(timm.list_models('{timm_name[:4]}*') lists its names)")
        if getattr(timm.get_pretrained_cfg(timm_name), "fixed_input_size", False):
            return (f"{name!r}: timm's {timm_name} takes one fixed input size, not the S×S RoI crops; "
                    f"for a ViT use one of {', '.join(VIT_SIZES)}")
        return None

    def __contains__(self, name: object) -> bool:
        return self.problem(name) is None

    def patch_size(self, name: str) -> int | None:
        """The patch side (pixels) of a ViT backbone, which its crops must be a multiple of;
        None for a CNN (any crop size)."""
        return PATCH if name in VIT_SIZES else None

    def vit_names(self) -> list[str]:
        return [name for name in self.names() if self.patch_size(name)]


#: name -> builder `(pretrained: bool) -> (module, feature_dim)`.
BACKBONES = BackboneRegistry("backbone")


def list_backbones() -> list[str]:
    return BACKBONES.names()


def create_backbone(name: str, checkpoint: str | None = None, *, pretrained: str = "none",
                    partial_ok: bool = False) -> tuple[nn.Module, int]:
    """Build the backbone `name`; weights from the local file `checkpoint` if given, or
    ImageNet weights through timm's hub loading with `pretrained="imagenet"`."""
    builder = BACKBONES.get(name)
    if pretrained not in ("none", "imagenet"):
        raise ValueError(f"pretrained must be 'none' or 'imagenet', got {pretrained!r}")
    if checkpoint is not None and pretrained != "none":
        raise ValueError("pass a backbone checkpoint or pretrained='imagenet', not both")
    if pretrained == "imagenet" and name in VIT_SIZES:
        raise BackboneLoadError(f"model.pretrained=imagenet is not offered for {name}: put a timm ViT "
                                "file (or a ViTPose / HMR 2.0 checkpoint) on disk and set "
                                "model.backbone_checkpoint")
    if checkpoint is not None:
        check_weights_file(checkpoint)
    try:
        module, dim = builder(pretrained == "imagenet")
    except Exception as error:  # no network, no cache entry, a hub error: one clear line
        if pretrained == "none":
            raise
        raise BackboneLoadError(
            f"model.pretrained=imagenet: timm could not load ImageNet weights for {name} "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); without "
            "network access, put a checkpoint on disk and set model.backbone_checkpoint") from None
    if pretrained == "imagenet":
        source = module.weights_target().pretrained_cfg.get("hf_hub_id") or "timm"
        log.info("[raytrain] backbone %s: ImageNet weights from timm (%s)", name, source)
    if checkpoint is not None:
        report = load_backbone_weights(module.weights_target(), checkpoint, partial_ok=partial_ok)
        level = logging.WARNING if report.fraction < QUIET_FRACTION else logging.INFO
        log.log(level, "[raytrain] backbone %s: %s", name, report.format())
    return module, dim


# -----------------------------------------------------------------------------
# wrappers

class PooledTimm(nn.Module):
    """A timm classifier with its classifier removed: globally average-pooled features."""

    def __init__(self, name: str, pretrained: bool = False, **kwargs):
        super().__init__()
        self.net = timm.create_model(name, pretrained=pretrained, num_classes=0, global_pool="avg", **kwargs)
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

    def __init__(self, name: str, pretrained: bool = False):
        super().__init__()
        self.net = timm.create_model(name, pretrained=pretrained, features_only=True,
                                     feature_location="", out_indices=(1, 2, 3, 4))
        self.dim = sum(self.net.feature_info.channels())

    def weights_target(self) -> nn.Module:
        return self.net

    def forward(self, x):  # (B,3,S,S) -> (B,d)
        return torch.cat([f.mean(dim=(2, 3)) for f in self.net(x)], dim=1)


def _pooled(name: str, pretrained: bool) -> tuple[nn.Module, int]:
    module = PooledTimm(name, pretrained)
    return module, module.dim


def _hrnet(name: str, pretrained: bool) -> tuple[nn.Module, int]:
    module = HRNetBranches(name, pretrained)
    return module, module.dim


# -----------------------------------------------------------------------------
# registry entries

@BACKBONES.register("resnet50")
def resnet50(pretrained=False):  # the paper's R50, d = 2048
    return _pooled("resnet50", pretrained)


@BACKBONES.register("hrnet_w48")
def hrnet_w48(pretrained=False):  # the paper's H48, d = 720
    return _hrnet("hrnet_w48", pretrained)


@BACKBONES.register("hrnet_w32")
def hrnet_w32(pretrained=False):  # d = 32 + 64 + 128 + 256 = 480
    return _hrnet("hrnet_w32", pretrained)


@BACKBONES.register("hrnet_w18_small")
def hrnet_w18_small(pretrained=False):  # CPU flavour of the HRNet layout, d = 16 + 32 + 64 + 128 = 240
    return _hrnet("hrnet_w18_small", pretrained)


@BACKBONES.register("resnet18")
def resnet18(pretrained=False):  # CPU flavour, d = 512, 11.2 M params
    return _pooled("resnet18", pretrained)


@BACKBONES.register("resnet10t")
def resnet10t(pretrained=False):  # CPU flavour, d = 512, 4.9 M params (tiered stem); demo default
    return _pooled("resnet10t", pretrained)


@BACKBONES.register("mobilenetv3_small_050")
def mobilenetv3_small_050(pretrained=False):  # fastest on CPU, d = 1024 (after its conv head), 0.57 M params
    return _pooled("mobilenetv3_small_050", pretrained)


def _vit(name: str) -> tuple[nn.Module, int]:
    module = PooledViT(*VIT_SIZES[name], drop_path=VIT_DROP_PATH[name])
    return module, module.dim


#: Stochastic depth of each ViT while fine-tuning: ViTPose's rates (B 0.3, L 0.5, H 0.55;
#: HMR 2.0 trains ViT-H with 0.55), none for the CPU flavour.
VIT_DROP_PATH = {"vit_tiny": 0.0, "vit_small": 0.1, "vit_base": 0.3, "vit_large": 0.5, "vit_huge": 0.55}


@BACKBONES.register("vit_tiny")
def vit_tiny(pretrained=False):  # CPU flavour (ViT-Ti/16, DeiT-Ti's size), d = 192, 5.5 M params
    return _vit("vit_tiny")


@BACKBONES.register("vit_small")
def vit_small(pretrained=False):  # ViT-S/16 (ViTPose-S), d = 384
    return _vit("vit_small")


@BACKBONES.register("vit_base")
def vit_base(pretrained=False):  # ViT-B/16 (ViTPose-B), d = 768
    return _vit("vit_base")


@BACKBONES.register("vit_large")
def vit_large(pretrained=False):  # ViT-L/16 (ViTPose-L), d = 1024
    return _vit("vit_large")


@BACKBONES.register("vit_huge")
def vit_huge(pretrained=False):  # ViT-H/16 (ViTPose-H, HMR 2.0's encoder), d = 1280
    return _vit("vit_huge")


# -----------------------------------------------------------------------------
# checkpoints

QUIET_FRACTION = 0.98  # below: the summary line is a warning
MIN_FRACTION = 0.90  # below: refused unless partial_ok (model.backbone_partial_ok)
_PREFIXES = ("module.", "backbone.", "encoder.", "model.", "net.")


class BackboneLoadError(ValueError):
    """A backbone checkpoint that cannot be used as asked (the message says why)."""


@dataclass
class LoadReport:
    """How a checkpoint matched a backbone: counts of its tensors (num_batches_tracked aside)."""

    path: str
    total: int  # backbone tensors
    matched: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # backbone tensors the file lacks
    mismatched: list[str] = field(default_factory=list)  # in both, other shape
    unused: list[str] = field(default_factory=list)  # file tensors nothing takes (heads)
    layout_gap: list[str] = field(default_factory=list)  # missing because the layout has none
    notes: list[str] = field(default_factory=list)  # what the layout adapter changed

    @property
    def fraction(self) -> float:
        """Matched share of the tensors the file's layout can hold."""
        return len(self.matched) / max(self.total - len(self.layout_gap), 1)

    def format(self) -> str:
        line = f"loaded {len(self.matched)}/{self.total} tensors"
        if self.layout_gap:
            line += (f" ({self.fraction:.1%} of the {self.total - len(self.layout_gap)} its layout has: "
                     f"{len(self.layout_gap)} {HRNET_POSE_GAP}, left at init)")
        else:
            line += f" ({self.fraction:.1%})"
        line += f" from {self.path}"
        line += "".join(f"; {note}" for note in self.notes)
        if self.missing or self.mismatched:
            line += f"; left at init: {_groups(self.missing + self.mismatched)}"
        if self.mismatched:
            line += f"; shape differs: {_groups(self.mismatched)}"
        if self.unused:
            line += f"; file tensors not used: {_groups(self.unused)}"
        return line


def _groups(keys: list[str]) -> str:
    """'layer3 (30, e.g. layer3.0.conv1.weight), ...': keys by top-level module."""
    by_top = Counter(key.split(".", 1)[0] for key in keys)
    first = {}
    for key in keys:
        first.setdefault(key.split(".", 1)[0], key)
    return ", ".join(f"{top} ({count}, e.g. {first[top]})" for top, count in by_top.most_common())


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
        if torch.is_tensor(value):
            out[key] = value
    return out


#: Largest backbone file read, on disk and inflated (a Lightning checkpoint of HMR 2.0 with
#: its optimiser state is a few GB).
MAX_WEIGHTS_BYTES = 16 << 30


def check_weights_file(path: str) -> None:
    """A regular file within MAX_WEIGHTS_BYTES (inflated, for a zip) or an error naming why;
    nothing of it is read but a zip's directory."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"backbone checkpoint not found: {path}") from None
    except OSError as err:
        raise BackboneLoadError(f"cannot read backbone checkpoint {path}: {err.strerror or err}") from None
    if stat.S_ISDIR(info.st_mode):
        raise BackboneLoadError(f"backbone checkpoint {path} is a directory, expected a weights file")
    if not stat.S_ISREG(info.st_mode):
        kinds = {stat.S_ISFIFO: "a FIFO", stat.S_ISCHR: "a character device", stat.S_ISBLK: "a block device",
                 stat.S_ISSOCK: "a socket"}
        kind = next((name for test, name in kinds.items() if test(info.st_mode)), "not a file")
        raise BackboneLoadError(f"backbone checkpoint {path} is {kind}, not a regular file; "
                                "pass a weights file")
    size = info.st_size
    if size <= MAX_WEIGHTS_BYTES and zipfile.is_zipfile(path):  # torch's format: members may be deflated
        try:
            with zipfile.ZipFile(path) as archive:
                size = max(size, sum(member.file_size for member in archive.infolist()))
        except (zipfile.BadZipFile, OSError) as err:
            raise BackboneLoadError(f"cannot read backbone checkpoint {path}: {err}") from None
    if size > MAX_WEIGHTS_BYTES:
        raise BackboneLoadError(f"backbone checkpoint {path} holds {size / 2**30:.1f} GiB, more than the "
                                f"{MAX_WEIGHTS_BYTES >> 30} GiB a backbone file may hold")


def _read_state(path: str) -> dict[str, torch.Tensor]:
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            return _unwrap_state_dict(load_file(path, device="cpu"))
        return _unwrap_state_dict(_torch_load(path))
    except pickle.UnpicklingError as e:  # a global even the stand-ins could not take
        detail = next((line.strip() for line in str(e).splitlines() if "WeightsUnpickler error:" in line
                       or "Unsupported" in line), "refused by torch's weights-only unpickler")
        raise BackboneLoadError(f"cannot read backbone checkpoint {path}: it holds more than tensors and "
                                f"plain containers ({detail[:200]})") from None
    except Exception as e:  # truncated file, wrong format
        line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BackboneLoadError(f"cannot read backbone checkpoint {path}: {line[:300]}") from None


#: Most classes a checkpoint may name beside its tensors (read as plain mappings).
MAX_STAND_INS = 64


def _torch_load(path: str):
    """torch.load with weights_only; a zip checkpoint that also pickles objects of other
    classes (HMR 2.0's Lightning file keeps its yacs CfgNode config in `hyper_parameters`)
    is read again with every such class name standing for an empty OrderedDict, so none of
    its code is reached and the tensors come out."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        try:
            unknown = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # not a zip checkpoint: nothing to stand in for
            unknown = []
        if not unknown or len(unknown) > MAX_STAND_INS:
            raise
    log.info("[raytrain] backbone checkpoint %s: %s read as plain mappings", path, ", ".join(unknown))
    with torch.serialization.safe_globals([(OrderedDict, name) for name in unknown]):
        return torch.load(path, map_location="cpu", weights_only=True)


HRNET_POSE_GAP = ("stage-4 fusion tensors into branches 1-3 (the HRNet pose net's last module "
                  "fuses into branch 0 only)")


def hrnet_pose_gap(missing: list[str], state: dict[str, torch.Tensor]) -> list[str]:
    """Missing keys that are the HRNet pose layout's known gap: its last stage-4 module
    has ``multi_scale_output=False``, so a pose file has no ``stage4.<last>.fuse_layers.{1,2,3}``
    (timm's HRNet, built for all four branch outputs, has them)."""
    modules = [int(k.split(".")[1]) for k in state if k.startswith("stage4.") and k.split(".")[1].isdigit()]
    if not modules:
        return []
    last = f"stage4.{max(modules)}.fuse_layers."
    if not any(k.startswith(last + "0.") for k in state) or any(k.startswith(last + "1.") for k in state):
        return []
    return [k for k in missing if k.startswith(last) and k[len(last)] in "123"]


def match_state(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor], path: str) -> LoadReport:
    """Which tensors of `state` fit the backbone's own state dict (by name and shape)."""
    def counted(key):
        return not key.endswith("num_batches_tracked")
    report = LoadReport(path=path, total=sum(1 for k in own if counted(k)))
    for key, tensor in own.items():
        if not counted(key):
            continue
        if key not in state:
            report.missing.append(key)
        elif state[key].shape != tensor.shape:
            report.mismatched.append(key)
        else:
            report.matched.append(key)
    report.unused = [k for k in state if counted(k) and k not in own]
    report.layout_gap = hrnet_pose_gap(report.missing, state)
    report.missing = [k for k in report.missing if k not in report.layout_gap]
    return report


def load_backbone_weights(module: nn.Module, path: str, partial_ok: bool = False) -> LoadReport:
    """Load the matching tensors of a local checkpoint into `module`; returns the report.

    Keys are matched by name after stripping wrapper prefixes (`module.`, `backbone.`, ...);
    timm, torchvision, HRNet-pose and SimpleBaseline files use the backbone's own names,
    their heads (`fc`, `classifier`, `final_layer`, `deconv_layers`) are reported unused.
    A ViT (timm's VisionTransformer, a PooledViT's net) first takes the ViTPose / HMR 2.0 /
    timm layouts to its names and position grid (vit.adapt_state). Refuses (BackboneLoadError naming what did not
    match) when less than MIN_FRACTION of the backbone's tensors match, unless `partial_ok`,
    and always when a matched tensor holds NaN or infinity.
    """
    check_weights_file(path)
    if hasattr(module, "weights_target"):  # a registry wrapper: its network's tensors
        module = module.weights_target()
    own = module.state_dict()
    state, notes = _read_state(path), []
    if isinstance(module, VisionTransformer) and module.num_prefix_tokens == 0:
        state, notes = adapt_state(module, state)
    report = match_state(own, state, path)
    report.notes = notes
    if not report.matched:
        raise BackboneLoadError(f"backbone checkpoint {path} has no tensor matching the model "
                                f"(e.g. model key {next(iter(own))!r}, file key "
                                f"{next(iter(state), None)!r})")
    if report.fraction < MIN_FRACTION and not partial_ok:
        raise BackboneLoadError(
            f"backbone checkpoint {path} matches only {len(report.matched)}/{report.total} tensors "
            f"({report.fraction:.0%}); left at init: {_groups(report.missing + report.mismatched)}"
            + (f"; file tensors not used: {_groups(report.unused)}" if report.unused else "")
            + "; set model.backbone_partial_ok=true to train from it anyway")
    _refuse_non_finite(state, report)
    module.load_state_dict({k: state[k] for k in report.matched}, strict=False)
    log.debug("backbone load report: %s", report)
    return report


def _refuse_non_finite(state: dict[str, torch.Tensor], report: LoadReport) -> None:
    bad = [k for k in report.matched if state[k].is_floating_point() and not torch.isfinite(state[k]).all()]
    if bad:
        raise BackboneLoadError(f"backbone checkpoint {report.path}: {len(bad)} of {len(report.matched)} "
                                f"matched tensors are non-finite (NaN or infinity: {_groups(bad)}); "
                                "not usable weights")
