"""A trained network from a checkpoint: which checkpoint, the config it was trained with, and
the one `load_trained_model` that eval, predict and the apps use.

    target = checkpoint_target("runs/.../checkpoint_000003", config=None)   # opened: hashed once
    model = load_trained_model(target, device="cpu", body_model=body)       # eval mode

The network is built from the training config **without** its training-only inputs: no
`model.backbone_checkpoint` file is read and no `model.pretrained` weights are downloaded
(the checkpoint's own weights are the model, SMPL's mean parameters included), and the
body model is the caller's (a stored `smpl_dir` is never read: a downloaded checkpoint must
not choose files to read). The weights are checked against the network before they load.
"""
import json
import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

import torch

from ..config import ConfigError, ExperimentConfig, config_from_raw, load_config, read_yaml, with_legacy_defaults
from ..data.io import is_remote, isdir
from ..files import read_bounded
from .format import STATE_FILE, Checkpoint, CheckpointError
from .select import candidates, open_checkpoint, rank, storage_errors

log = logging.getLogger(__name__)

MAX_PARAMS_BYTES = 1 << 20

#: Keys that decide the network a checkpoint's weights belong to (or how its inputs
#: are made): an evaluation config must agree with the checkpoint's on each.
MODEL_KEYS = ("rois.num_rois", "rois.schedule", "model.backbone", "model.fusion", "model.fusion_hidden",
              "model.attention_heads", "model.pe_bands", "model.decoder_iters", "model.decoder_hidden",
              "model.bbox_info_to_decoders", "model.cam_init", "model.proj_dim", "model.proj_hidden",
              "data.crop_size")


class CheckpointMismatch(ConfigError):
    """The checkpoint's weights do not fit the network its config describes."""


@dataclass
class Target:
    """An opened checkpoint and the training config it belongs to."""
    checkpoint: Checkpoint
    config: ExperimentConfig
    config_source: str

    @property
    def path(self) -> Path:
        """The local directory (a copy in the cache for a checkpoint in object storage)."""
        return self.checkpoint.path

    @property
    def origin(self) -> str:
        """The path or URL the checkpoint was named by."""
        return self.checkpoint.origin

    @property
    def step(self) -> int:
        return self.checkpoint.step

    @property
    def stored_metrics(self) -> dict[str, float]:
        return self.checkpoint.metrics

    @property
    def label(self) -> str:
        path = PurePosixPath(self.origin)
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{path.parent.name}-{path.name}")[:80]


def checkpoint_target(where: str | Path, config: str | None = None) -> Target:
    """Checkpoint directory `where` (local path, or URL copied into the cache first), opened
    once, with its training config (`checkpoint_config`)."""
    return target_of(open_checkpoint(where), config)


def target_of(checkpoint: Checkpoint, config: str | None = None) -> Target:
    cfg, source = checkpoint_config(checkpoint, config)
    return Target(checkpoint=checkpoint, config=cfg, config_source=source)


def select_checkpoints(experiment: str, best: bool = False, top: int = 1,
                       config: str | None = None) -> list[Target]:
    """The checkpoints of an experiment to evaluate, best first.

    With ``best`` and top == 1, the tuning export ``<experiment>/best/`` is used when it
    holds a complete checkpoint (its YAML config serves when the checkpoint stores none).
    Otherwise the checkpoints below ``experiment`` (outside ``best/`` and ``eval/``) are
    ranked from their commit records (`select.rank`: per trial the lowest stored
    ``val_mpjpe`` with ``best``, else the latest; trials by that ``val_mpjpe``); only the
    first ``top`` are opened (copied first from object storage).
    """
    with storage_errors(experiment):
        if not isdir(experiment):
            raise CheckpointError(f"experiment directory {experiment} not found")
    exported = Path(experiment) / "best"
    if best and top == 1 and not is_remote(experiment) and exported.is_dir():
        chosen = rank(candidates(exported), best=True, top=1)
        if chosen:
            return [target_of(chosen[0], config or _exported_config(exported))]
    found = candidates(experiment, skip={"best", "eval"})
    chosen = rank(found, best, top) if found else []
    if not chosen:
        raise CheckpointError(f"no complete checkpoint below {experiment}")
    return [target_of(checkpoint, config) for checkpoint in chosen]


def _exported_config(folder: Path) -> str | None:
    yamls = sorted(folder.glob("*.yaml")) + sorted(folder.glob("*.yml"))
    preferred = [p for p in yamls if "config" in p.name] or yamls
    return str(preferred[0]) if preferred else None


# ----------------------------------------------------------------------------- configs


def checkpoint_config(checkpoint: Checkpoint, config: str | None = None) -> tuple[ExperimentConfig, str]:
    """(ExperimentConfig, where it came from) of a checkpoint.

    Order: the explicit ``config`` YAML (refused when it describes another network than
    the stored config, `check_same_model`); the config stored in the checkpoint (JSON
    text); ``params.json`` of the Ray trial (``train_loop_config``); a YAML beside the
    checkpoint or one level up (the tuning export's best config).
    """
    path = checkpoint.path
    stored = checkpoint.state().get("config")
    if config:
        cfg = load_config(config)
        if stored:
            check_same_model(config_from_raw(_stored_raw(stored, path), f"{path} (stored)"), cfg, path, config)
        return cfg, str(config)
    if stored:
        return config_from_raw(_stored_raw(stored, path), f"{path} (stored)"), f"stored in {path / STATE_FILE}"
    for folder in [path, *list(path.parents)[:3]]:
        params = folder / "params.json"
        if params.is_file():
            try:
                raw = json.loads(read_bounded(str(params), MAX_PARAMS_BYTES, str(params)))
                raw = raw.get("train_loop_config", raw)
                raw = dict(raw.get("config", raw))  # a Ray Train run's loop config holds it
            except (OSError, ValueError, TypeError, AttributeError, RecursionError):
                continue
            try:
                return config_from_raw(with_legacy_defaults(raw), str(params)), str(params)
            except ConfigError:
                pass
    for folder in (path, path.parent):
        for yaml_path in sorted(folder.glob("*.yaml")) + sorted(folder.glob("*.yml")):
            try:
                return config_from_raw(read_yaml(str(yaml_path)), str(yaml_path)), str(yaml_path)
            except ConfigError:
                continue
    raise ConfigError(f"{path}: no training config found (not stored in the checkpoint, no "
                      "params.json of a Ray trial, no config YAML beside it); pass config=...")


def check_same_model(stored: ExperimentConfig, given: ExperimentConfig, path, config: str) -> None:
    """``ConfigError`` naming every key of ``MODEL_KEYS`` where ``config`` differs from the
    config stored in the checkpoint: weights that happen to load would still be scored
    under another architecture, RoI count or camera start."""
    differences = []
    for key in MODEL_KEYS:
        section, name = key.split(".")
        mine, theirs = getattr(getattr(given, section), name), getattr(getattr(stored, section), name)
        if mine != theirs:
            differences.append(f"{key}={mine!r} (checkpoint: {theirs!r})")
    if differences:
        raise ConfigError(f"--config {config} differs from the config stored in {path}: "
                          f"{', '.join(differences)}; drop --config or make them agree")


def _stored_raw(stored, path: Path) -> dict:
    """The config a checkpoint stores (JSON text) as a dict with legacy defaults."""
    try:
        raw = json.loads(stored) if isinstance(stored, str) else stored
    except (ValueError, RecursionError) as err:
        raise ConfigError(f"{path}: the stored config is not valid JSON ({str(err)[:100]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the stored config is not a mapping")
    return with_legacy_defaults(raw)


# ----------------------------------------------------------------------------- the network


def trained_network(cfg: ExperimentConfig, body_model=None) -> torch.nn.Module:
    """The network ``cfg`` describes, with none of its training-only inputs (no backbone
    file, no hub download, default mean parameters): the shape its trained weights fit."""
    from ..model import build_model
    model_cfg = replace(cfg.model, backbone_checkpoint=None, pretrained="none")
    return build_model(model_cfg, body_model=body_model)


def load_trained_model(checkpoint: Target | Checkpoint, device: str | torch.device | None = None,
                       body_model=None) -> torch.nn.Module:
    """The trained network of ``checkpoint`` in eval mode on ``device`` (default: CUDA when
    there is one), its weights checked against it first (`check_weights`); ``body_model``
    gives the meshes (None: parameters only). The checkpoint is read once (it was hashed
    when opened)."""
    target = checkpoint if isinstance(checkpoint, Target) else target_of(checkpoint)
    model = trained_network(target.config, body_model)
    weights = target.checkpoint.state().get("model")
    if not isinstance(weights, dict):
        raise CheckpointMismatch(f"{target.origin}: the checkpoint holds no model weights")
    check_weights(model, weights, target.origin, target.config_source)
    model.load_state_dict(weights)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return model.to(device).eval()


def check_weights(model: torch.nn.Module, weights: dict, checkpoint: str, config_source: str) -> None:
    """One clear error when the stored weights are not those of ``model``."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    shapes = [k for k in expected if k in weights and (not torch.is_tensor(weights[k])
                                                       or weights[k].shape != expected[k].shape)]
    if not (missing or unexpected or shapes):
        return
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("of another shape", shapes)):
        if keys:
            parts.append(f"{len(keys)} {label} (e.g. {keys[0]})")
    raise CheckpointMismatch(f"{checkpoint}: its weights do not fit the network of the config "
                             f"({config_source}): {', '.join(parts)}; pass the config it was "
                             "trained with (--config) or another checkpoint")
