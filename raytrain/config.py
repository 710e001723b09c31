"""Typed experiment configuration: dataclasses, one YAML per experiment, dotted overrides.

    cfg = load_config("configs/demo.yaml", ["model.backbone=resnet18", "optim.lr=3e-4"])
    cfg = load_config("r50_paper")       # a shipped config by its bare name, from any directory

Every field carries its help text and bounds in `metadata`; `validate` checks them and
the cross-field rules, and every error names the dotted key. The README's configuration
reference is generated from these dataclasses (`config_reference_markdown`).
"""
import dataclasses
import math
import os
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .registry import lookup


class ConfigError(ValueError):
    """An invalid configuration; the message names the key."""


def opt(default, help: str, *, min=None, max=None, choices=None, registry=None, factory=False, augment=False):
    """A dataclass field with help text and bounds; `registry` names the registry
    (raytrain.registry.lookup) whose names the value must be one of; `augment` marks a
    training augmentation setting (its value 0 turns it off; data/augment.py reads it)."""
    meta = {"help": help, "min": min, "max": max, "choices": choices, "registry": registry, "augment": augment}
    if factory:
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class MixtureSource:
    name: str = opt("", "label of the source in progress lines and TensorBoard (e.g. h36m)")
    shards: str = opt("", "the source's shards, same forms as data.train_shards")
    weight: float = opt(1.0, "share of every training epoch drawn from this source (weights are normalised)",
                        min=0.0)


@dataclass
class DataConfig:
    train_shards: str = opt("", "training shards: a directory, a brace pattern or a manifest.json (local path or "
                                "s3://, gs:// URL)")
    mixture: list[MixtureSource] = opt(list, "train on several shard sets in fixed ratios instead of "
                                             "data.train_shards: a list of {name, shards, weight} (docs/design.md)",
                                       factory=True)
    val_shards: str = opt("", "validation shards, same forms as train_shards")
    crop_size: int = opt(224, "side S of each square RoI crop in pixels", min=32, max=1024)
    batch_size: int = opt(48, "persons per optimisation step over all workers (each brings M crops)", min=1)
    val_batch_size: int = opt(32, "persons per validation batch per worker", min=1)
    loader_workers: int = opt(2, "DataLoader worker processes per training worker (decode + crop)", min=0)
    persistent_workers: bool = opt(True, "keep the DataLoader workers alive from one epoch (and validation pass) to "
                                         "the next instead of forking them again")
    shuffle_buffer: int = opt(1000, "samples held in the shuffle buffer", min=1)
    max_bad_fraction: float = opt(0.01, "stop the run when more than this fraction of an epoch's samples is bad",
                                  min=0.0, max=1.0)
    max_val_samples: int = opt(0, "cap on validation samples (0: all)", min=0)
    verify_checksums: bool = opt(False, "check every shard's sha256 against its manifest before training (reads "
                                        "all shards once); a shard whose size differs is always reported")
    device_crop: bool = opt(False, "training split: the loader workers only decode; the RoI crops and their "
                                   "augmentation are made on the training device (grid_sample); validation "
                                   "crops in the workers")
    flip_prob: float = opt(0.5, "probability of a horizontal flip (all RoIs of a person together)", min=0.0, max=1.0,
                           augment=True)
    scale_jitter: float = opt(0.25, "box scale jitter: factor drawn from [1 - x, 1 + x]", min=0.0, max=0.9,
                              augment=True)
    rot_jitter_deg: float = opt(30.0, "rotation jitter in degrees (applied with probability 0.4)", min=0.0, max=180.0,
                                augment=True)
    color_jitter: float = opt(0.4, "per-channel colour gain jitter", min=0.0, max=1.0, augment=True)
    occlusion_prob: float = opt(0.0, "probability of a synthetic occluding rectangle", min=0.0, max=1.0,
                                augment=True)
    roi_color_jitter: float = opt(0.0, "per-RoI colour gain jitter on top of the person's (RoIs of one person then "
                                       "differ in colour; 0: off)", min=0.0, max=1.0, augment=True)


@dataclass
class RoIConfig:
    schedule: str = opt("paper", "RoI schedule", registry="schedule")
    num_rois: int = opt(5, "M, RoIs per person", min=1, max=5)
    offset: float = opt(0.1, "fixed schedule: offset magnitude in units of the box side", min=0.0, max=1.0)
    scales: list[float] = opt(lambda: [1.5, 1.25, 0.8, 0.65], "fixed schedule: resize factors of RoIs 1..4",
                              factory=True)
    max_offset: float = opt(0.1, "random schedule: offsets drawn from [-x, x] per axis", min=0.0, max=1.0)
    scale_min: float = opt(0.65, "random schedule: smallest resize factor", min=0.1, max=3.0)
    scale_max: float = opt(1.5, "random schedule: largest resize factor", min=0.1, max=3.0)


@dataclass
class ModelConfig:
    backbone: str = opt("resnet50", "encoder from the backbone registry, or `timm:<name>` for any timm CNN "
                                    "(README \"Backbones\")", registry="backbone")
    backbone_checkpoint: str | None = opt(None, "local checkpoint for the backbone: HRNet-pose pose_hrnet_*.pth, "
                                                "SimpleBaseline pose_resnet_*.pth, ViTPose and HMR 2.0 checkpoints "
                                                "(ViTs), timm or torchvision ImageNet files (.pth, .safetensors)")
    backbone_partial_ok: bool = opt(False, "accept a backbone checkpoint that matches less than 90% of the backbone's "
                                           "tensors (the rest stays at random init)")
    pretrained: str = opt("none", "'imagenet': ImageNet weights through timm's hub loading (needs the network or a "
                                  "filled Hugging Face cache); exclusive with model.backbone_checkpoint",
                          choices=["none", "imagenet"])
    fusion: str = opt("raf", "RoI fusion variant", registry="fusion")
    fusion_hidden: int = opt(256, "fusion scorer: 0 = the paper's single Linear over F_mn (then RAF's weights cannot "
                                  "depend on m and equal abs_pe's: softmax over n cancels the gamma_m term); > 0 = a "
                                  "2-layer MLP of this width [choice]", min=0)
    attention_heads: int = opt(8, "heads of the self_attention fusion variant", min=1)
    pe_bands: int = opt(32, "L, frequency bands of the box positional encoding", min=0, max=64)
    decoder_iters: int = opt(3, "iterative refinement steps of both decoders", min=1, max=10)
    decoder_hidden: int = opt(1024, "hidden width of the decoders", min=8)
    bbox_info_to_decoders: bool = opt(True, "feed CLIFF's bbox_info to the decoders")
    cam_init: str = opt("consistent", "start of D_cam's refinement: 'consistent' = the mean crop camera in the RoIs' "
                                      "mean box, carried to every RoI through its full camera, so L_cam starts at 0 "
                                      "[choice, docs/method.md §9.3]; 'mean' = the mean crop camera in every RoI "
                                      "(SPIN/CLIFF)", choices=["consistent", "mean"])
    proj_dim: int = opt(128, "contrastive projection dimension", min=2)
    proj_hidden: int = opt(0, "hidden width of the projection MLP (0: same as the encoder's)", min=0)
    dropout: float = opt(0.5, "dropout in the decoders", min=0.0, max=0.95)
    smpl_dir: str | None = opt(None, "directory with SMPL_{NEUTRAL,MALE,FEMALE}.pkl, J_regressor_h36m.npy, "
                                     "smpl_mean_params.npz (default: the synthetic body model)")


@dataclass
class LossConfig:
    lambda_cam: float = opt(1.0, "weight of the camera-consistency loss", min=0.0)
    lambda_cont: float = opt(0.1, "weight of the contrastive loss", min=0.0)
    lambda_pose: float = opt(1.0, "weight of the SMPL pose loss (rotation matrices)", min=0.0)
    lambda_betas: float = opt(0.001, "weight of the SMPL shape loss", min=0.0)
    lambda_vert: float = opt(1.0, "weight of the vertex loss", min=0.0)
    lambda_3d: float = opt(5.0, "weight of the pelvis-aligned 3D joint loss", min=0.0)
    lambda_2d: float = opt(5.0, "weight of the 2D keypoint loss (summed over RoIs)", min=0.0)
    cam_weights: list[float] = opt(lambda: [0.1, 0.1, 1e-4], "lambda_x, lambda_y, lambda_s inside L_cam", factory=True)
    tau: float = opt(0.5, "contrastive temperature", min=1e-3, max=10.0)
    gather_negatives: bool = opt(True, "take contrastive negatives from the global batch across DDP workers")
    cont_warmup_steps: int = opt(0, "ramp lambda_cont linearly from 0 to its value over this many steps (0: off)",
                                 min=0)


@dataclass
class OptimConfig:
    lr: float = opt(1e-4, "Adam learning rate", min=0.0, max=1.0)
    betas: list[float] = opt(lambda: [0.9, 0.999], "Adam betas", factory=True)
    weight_decay: float = opt(0.0, "Adam weight decay", min=0.0)
    optimizer: str = opt("adam", "'adam': the paper's (weight decay as an L2 term on every weight); 'adamw': "
                                 "decoupled weight decay, none on biases, norms and position embeddings (the ViT "
                                 "recipe)", choices=["adam", "adamw"])
    layer_decay: float = opt(1.0, "layer-wise lr decay of a ViT encoder: block i of L trains at lr * x^(L - i), the "
                                  "patch and position embeddings at lr * x^(L + 1), the final norm and the rest "
                                  "of the network at lr (1: off; ViT backbones only)", min=0.0, max=1.0)
    epochs: int = opt(25, "training epochs", min=1)
    max_steps: int = opt(0, "stop after this many optimisation steps (0: epochs decide)", min=0)
    lr_schedule: str = opt("none", "learning-rate schedule", choices=["none", "cosine", "step"])
    warmup_steps: int = opt(0, "linear warm-up steps", min=0)
    grad_clip: float = opt(0.0, "clip the gradient norm to this value (0: off)", min=0.0)
    amp: str = opt("none", "mixed precision on GPU", choices=["none", "bf16", "fp16"])


@dataclass
class RayConfig:
    address: str | None = opt(None, "Ray cluster address (None: connect to RAY_ADDRESS or start a local instance)")
    num_cpus: int | None = opt(None, "CPUs of a local Ray instance started in-process (None: all)", min=1)
    num_workers: int = opt(1, "training workers (one per GPU)", min=1)
    use_gpu: bool = opt(False, "one GPU per training worker")
    cpus_per_worker: float = opt(1.0, "CPUs reserved per training worker (fractions allowed)", min=0.0)
    max_failures: int = opt(2, "worker-group restarts before the run fails", min=-1)


@dataclass
class TrainConfig:
    storage_path: str = opt("runs", "where runs and checkpoints go (local path or s3://, gs:// URL)")
    checkpoint_every: int = opt(500, "steps between checkpoints", min=1)
    val_every: int = opt(500, "steps between validations", min=1)
    keep_checkpoints: int = opt(3, "keep the best K checkpoints by validation MPJPE", min=1)
    log_every: int = opt(20, "steps between progress lines", min=1)
    tensorboard: bool = opt(True, "write TensorBoard event files")
    mlflow_uri: str | None = opt(None, "MLflow tracking URI (optional extra)")
    sample_log: str | None = opt(None, "append 'step epoch key' of every training sample to <this>.rank<r>.txt "
                                       "(audits resume)")
    accept_changed_run: bool = opt(False, "resume a run directory whose recorded fingerprint (run_identity.json: "
                                          "data sources, RoI schedule, model) differs from this config's; a change "
                                          "of the network itself always needs a new name")


@dataclass
class ExperimentConfig:
    name: str = opt("experiment", "run name (directory under train.storage_path); default: the config "
                                  "file's name (configs/r50_paper.yaml -> r50_paper)")
    seed: int = opt(0, "global seed", min=0)
    data: DataConfig = opt(DataConfig, "data", factory=True)
    rois: RoIConfig = opt(RoIConfig, "RoI schedule", factory=True)
    model: ModelConfig = opt(ModelConfig, "network", factory=True)
    loss: LossConfig = opt(LossConfig, "loss weights", factory=True)
    optim: OptimConfig = opt(OptimConfig, "optimisation", factory=True)
    ray: RayConfig = opt(RayConfig, "Ray resources", factory=True)
    train: TrainConfig = opt(TrainConfig, "training loop, checkpoints and logging", factory=True)


# ----------------------------------------------------------------------------- loading

def load_config(path: str | None = None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read a YAML experiment (or the defaults), apply `key.sub=value` overrides, validate."""
    raw = read_yaml(named_file(str(path), "configs")) if path else {}
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(raw, key, value)
    if path and isinstance(raw, dict) and "name" not in raw:
        raw["name"] = run_name_of(path)
    return config_from_raw(raw)


def run_name_of(path: str) -> str:
    """The default run name of a config file: its name without the suffix, made a plain
    run name (``configs/r50_paper.yaml`` -> ``r50_paper``)."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", Path(path).stem)[:128].lstrip("._-")
    return name or "experiment"


def config_from_raw(raw: dict[str, Any], where: str = "") -> ExperimentConfig:
    """A validated ExperimentConfig from a plain dict; `where` prefixes any error."""
    try:
        cfg = from_dict(ExperimentConfig, raw, prefix="")
        validate(cfg)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}" if where else str(err)) from None
    return cfg


# ----------------------------------------------------------------------------- shipped files

_PACKAGE = Path(__file__).resolve().parent

#: Where each kind of shipped file sits in a checkout; a wheel installs it as raytrain/<kind>
#: (pyproject.toml's package-dir), an editable install reads the checkout's folder.
_CHECKOUT_FOLDER = {"configs": "configs", "spaces": "tune/spaces"}
_WHAT = {"configs": "config", "spaces": "search space"}


def _shipped_folder(kind: str) -> Path:
    installed = _PACKAGE / kind
    return installed if installed.is_dir() else _PACKAGE.parent / _CHECKOUT_FOLDER[kind]


def _shipped(kind: str, name: str) -> Path:
    return _shipped_folder(kind) / (name if name.endswith(".yaml") else f"{name}.yaml")


def shipped_config(name: str) -> Path:
    """The shipped experiment config `name` (`r50_paper` or `r50_paper.yaml`): configs/ of the checkout,
    or the copy inside an installed wheel."""
    return _shipped("configs", name)


def shipped_space(name: str) -> Path:
    """The shipped search space `name` (`paper` or `paper.yaml`): tune/spaces/ of the checkout, or the
    copy inside an installed wheel."""
    return _shipped("spaces", name)


def shipped_names(kind: str) -> list[str]:
    """The bare names of the shipped `configs` or `spaces`."""
    return sorted(p.stem for p in _shipped_folder(kind).glob("*.yaml"))


def named_file(arg: str, kind: str) -> str:
    """The file a `--config` (kind `configs`) or `--space` (kind `spaces`) argument names: a path means
    that file; a bare name (no folder part, no such file here) means the shipped file of that name, from
    any directory (`--config r50_paper`, `--space paper`)."""
    if Path(arg).name != arg or Path(arg).is_file():
        if not Path(arg).exists() and _shipped(kind, Path(arg).name).is_file():
            raise ConfigError(f"{arg}: no such file here; the shipped {_WHAT[kind]} of that name is "
                              f"`{Path(arg).stem}` (a bare name works from any directory)")
        return arg
    path = _shipped(kind, arg)
    if not path.is_file():
        raise ConfigError(f"{arg}: no such file, and no shipped {_WHAT[kind]} of that name "
                          f"(shipped: {', '.join(shipped_names(kind))})")
    return str(path)


#: Largest config or search-space file read (bytes).
MAX_YAML_BYTES = 1 << 20


class _NoAliasLoader(yaml.SafeLoader):
    """YAML without anchors and aliases: configs do not need them, and an alias bomb
    (a few lines that expand to billions of nodes) must not reach the config code."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, f"YAML alias *{event.anchor} (anchors and "
                                              "aliases are not allowed)", event.start_mark)
        return super().compose_node(parent, index)


def safe_yaml(text: str):
    """Parse YAML text: safe types only, no aliases."""
    return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass


def short(value, limit: int = 120) -> str:
    """``repr(value)`` cut to ``limit`` characters, for error messages."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def read_yaml(path: str) -> dict[str, Any]:
    from .files import read_bounded
    if os.path.isdir(path):
        raise ConfigError(f"{path}: is a directory, expected a YAML file")
    try:
        payload = read_bounded(path, MAX_YAML_BYTES, f"config file {path}", ConfigError)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read ({err.strerror or err})") from None
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start}); save the file as UTF-8") from None
    try:
        data = safe_yaml(text)
    except RecursionError:
        raise ConfigError(f"malformed YAML in {path}: nested too deeply") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"malformed YAML in {path}{where}: {problem[:200]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def parse_override(item: str):
    """'model.backbone=hrnet_w48' -> ('model.backbone', 'hrnet_w48'); values parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key.sub=value")
    key, text = item.split("=", 1)
    try:
        value = safe_yaml(text) if text != "" else ""
    except (yaml.YAMLError, RecursionError):
        value = text
    return key.strip(), value


def set_dotted(tree: dict[str, Any], key: str, value: Any):
    parts = key.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parts[:i + 1])}: is a value, cannot set {key}")
        node = child
    node[parts[-1]] = value


#: (section, key) -> the value the code used before the key existed. A config stored by a
#: checkpoint or a Ray trial (a full dump of its time) that lacks the key ran with that.
LEGACY_DEFAULTS = {("model", "cam_init"): "mean"}


def with_legacy_defaults(raw: dict[str, Any]) -> dict[str, Any]:
    """A stored full config dump with the keys it predates set to their old behaviour."""
    out = {key: dict(value) if isinstance(value, dict) else value for key, value in raw.items()}
    for (section, key), value in LEGACY_DEFAULTS.items():
        if isinstance(out.get(section), dict) and key not in out[section]:
            out[section][key] = value
    return out


def from_dict(cls, raw: dict[str, Any], prefix: str):
    """Build dataclass `cls` from a mapping, coercing types; unknown keys fail naming the key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {short(raw)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            close = [n for n in fields if n.startswith(str(key)[:3])]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"{prefix}{str(key)[:80]}: unknown key{hint}; known: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in raw.items():
        kwargs[name] = coerce(value, hints[name], f"{prefix}{name}")
    return cls(**kwargs)


def coerce(value, tp, key: str):
    """Convert a YAML value to the annotated type or fail naming the key."""
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value if value is not None else {}, prefix=f"{key}.")
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):                       # X | None
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return coerce(value, next(a for a in args if a is not type(None)), key)
    if origin in (list, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {short(value)}")
        return [coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {short(value)}")
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or
                                           (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"{key}: expected an integer, got {short(value)}")
        return int(value)
    if tp is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {short(value)}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {short(value)}")
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {short(value)}")
        return str(value)
    return value


# ----------------------------------------------------------------------------- validation

#: A run name is one directory under train.storage_path: no '/', no '..'.
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def validate(cfg: ExperimentConfig):
    """Bounds and choices of every field, then cross-field rules. Raises ConfigError."""
    _check_fields(cfg, "")
    if not RUN_NAME.fullmatch(cfg.name):
        raise ConfigError(f"name: {short(cfg.name, 80)} is not a plain run name (letters, digits, '.', '_', "
                          "'-', starting with a letter or digit, at most 128 characters): it becomes a "
                          "directory under train.storage_path")
    if cfg.rois.scale_min > cfg.rois.scale_max:
        raise ConfigError(f"rois.scale_min ({cfg.rois.scale_min}) must not exceed rois.scale_max "
                          f"({cfg.rois.scale_max})")
    if cfg.rois.schedule in ("paper", "fixed") and len(cfg.rois.scales) < cfg.rois.num_rois - 1:
        raise ConfigError(f"rois.scales: needs {cfg.rois.num_rois - 1} factors for "
                          f"rois.num_rois={cfg.rois.num_rois}, got {len(cfg.rois.scales)}")
    if any(s <= 0 for s in cfg.rois.scales):
        raise ConfigError(f"rois.scales: factors must be positive, got {cfg.rois.scales}")
    if len(cfg.loss.cam_weights) != 3:
        raise ConfigError("loss.cam_weights: expected 3 values (lambda_x, lambda_y, lambda_s), got "
                          f"{cfg.loss.cam_weights}")
    if len(cfg.optim.betas) != 2 or not all(0 <= b < 1 for b in cfg.optim.betas):
        raise ConfigError(f"optim.betas: expected two values in [0, 1), got {cfg.optim.betas}")
    if cfg.data.batch_size < cfg.ray.num_workers:
        raise ConfigError(f"data.batch_size ({cfg.data.batch_size}) is smaller than ray.num_workers "
                          f"({cfg.ray.num_workers}): every worker needs at least one person")
    per_worker = cfg.data.batch_size // cfg.ray.num_workers
    if cfg.loss.lambda_cont > 0 and cfg.rois.num_rois >= 2 and per_worker < 2 and not cfg.loss.gather_negatives:
        raise ConfigError("loss.lambda_cont > 0 needs at least 2 persons per worker (data.batch_size) or "
                          "loss.gather_negatives=true")
    _check_mixture(cfg.data)
    if cfg.model.pretrained != "none" and cfg.model.backbone_checkpoint:
        raise ConfigError(f"model.pretrained={cfg.model.pretrained} and model.backbone_checkpoint are exclusive: "
                          "weights come from timm's hub or from the file")
    _check_vit(cfg)
    if cfg.optim.amp != "none" and not cfg.ray.use_gpu:
        raise ConfigError(f"optim.amp={cfg.optim.amp} needs ray.use_gpu=true (mixed precision runs on GPU only)")


def _check_vit(cfg: ExperimentConfig):
    """A ViT's crops are whole patches; layer-wise lr decay needs a ViT's blocks (the
    backbone registry says which backbones are ViTs and their patch)."""
    backbones = lookup("backbone")
    patch = backbones.patch_size(cfg.model.backbone)
    if patch and cfg.model.pretrained != "none":
        raise ConfigError(f"model.pretrained={cfg.model.pretrained} is not offered for {cfg.model.backbone}: "
                          "set model.backbone_checkpoint to a timm ViT, ViTPose or HMR 2.0 file")
    if patch and cfg.data.crop_size % patch:
        raise ConfigError(f"data.crop_size: {cfg.data.crop_size} is not a multiple of {cfg.model.backbone}'s "
                          f"{patch}-pixel patch (e.g. {cfg.data.crop_size // patch * patch or patch})")
    if not cfg.optim.layer_decay > 0:
        raise ConfigError(f"optim.layer_decay: {cfg.optim.layer_decay} must be above 0 (1: off)")
    if cfg.optim.layer_decay < 1 and not patch:
        raise ConfigError(f"optim.layer_decay: {cfg.optim.layer_decay} applies to the ViT backbones "
                          f"({', '.join(backbones.vit_names())}); model.backbone={cfg.model.backbone} has no "
                          "blocks to decay: set optim.layer_decay=1")


def _check_mixture(data: DataConfig):
    """data.mixture: named sources with shards and weights of positive sum (each weight's
    bounds are checked with every other field); not both a mixture and data.train_shards."""
    if not data.mixture:
        return
    if data.train_shards:
        raise ConfigError("data.train_shards: set data.train_shards or data.mixture, not both")
    names = []
    for i, source in enumerate(data.mixture):
        key = f"data.mixture[{i}]"
        if not source.name or not source.shards:
            raise ConfigError(f"{key}: needs a name and shards, got name={source.name!r} "
                              f"shards={source.shards!r}")
        names.append(source.name)
    if len(set(names)) != len(names):
        raise ConfigError(f"data.mixture: source names repeat: {names}")
    total = sum(source.weight for source in data.mixture)
    if not total > 0:
        raise ConfigError(f"data.mixture: weights sum to {total}, need a positive sum")


def _check_fields(obj, prefix: str):
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            _check_fields(value, f"{key}.")
            continue
        if isinstance(value, list) and any(dataclasses.is_dataclass(v) for v in value):
            for i, item in enumerate(value):   # data.mixture: each source's fields
                _check_fields(item, f"{key}[{i}].")
            continue
        meta = f.metadata
        if meta.get("choices") is not None and value not in meta["choices"]:
            raise ConfigError(f"{key}: {value!r} is not one of {meta['choices']}")
        if meta.get("registry") is not None and (problem := lookup(meta["registry"]).problem(value)):
            raise ConfigError(f"{key}: {problem}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value}")
        if isinstance(value, list) and any(isinstance(v, float) and not math.isfinite(v) for v in value):
            raise ConfigError(f"{key}: expected finite numbers, got {value}")
        if value is None or isinstance(value, (list, str, bool)):
            continue
        if meta.get("min") is not None and value < meta["min"]:
            raise ConfigError(f"{key}: {value} is below the minimum {meta['min']}")
        if meta.get("max") is not None and value > meta["max"]:
            raise ConfigError(f"{key}: {value} is above the maximum {meta['max']}")


# ----------------------------------------------------------------------------- output

def to_dict(cfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg, path: str | None = None) -> str:
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    if path:
        Path(path).write_text(text)
    return text


def config_reference_markdown() -> str:
    """The configuration reference table, generated from the dataclasses."""
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for section in dataclasses.fields(ExperimentConfig):
        default = getattr(ExperimentConfig(), section.name)
        if not dataclasses.is_dataclass(default):
            lines.append(_reference_row(section.name, default, section.metadata))
            continue
        for f in dataclasses.fields(default):
            lines.append(_reference_row(f"{section.name}.{f.name}", getattr(default, f.name), f.metadata))
    return "\n".join(lines) + "\n"


def _reference_row(key, default, meta):
    bounds = []
    if meta.get("choices"):
        bounds.append("one of " + ", ".join(f"`{c}`" for c in meta["choices"]))
    if meta.get("registry"):
        bounds.append("registered: " + ", ".join(f"`{c}`" for c in lookup(meta["registry"]).names()))
    if meta.get("min") is not None:
        bounds.append(f"≥ {meta['min']}")
    if meta.get("max") is not None:
        bounds.append(f"≤ {meta['max']}")
    extra = f" ({'; '.join(bounds)})" if bounds else ""
    return f"| `{key}` | `{default}` | {meta.get('help', '')}{extra} |"


REFERENCE_START = "<!-- config-reference:start (generated: python -m raytrain.config README.md) -->"
REFERENCE_END = "<!-- config-reference:end -->"


def update_reference(readme: str) -> bool:
    """Rewrite the generated configuration table inside `readme`; True when it changed."""
    path = Path(readme)
    text = path.read_text()
    start, end = text.index(REFERENCE_START) + len(REFERENCE_START), text.index(REFERENCE_END)
    new = text[:start] + "\n" + config_reference_markdown() + text[end:]
    if new != text:
        path.write_text(new)
    return new != text


if __name__ == "__main__":
    import sys
    target = sys.argv[1] if len(sys.argv) > 1 else "README.md"
    print(f"{target}: {'updated' if update_reference(target) else 'already up to date'}")
