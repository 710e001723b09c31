"""`raytrain eval`: evaluate checkpoints on a shard set with the 3DPW / H36M mesh protocol.

    raytrain eval --checkpoint runs/demo/ray/demo/<trial>/checkpoint_000003 --data shards/val
    raytrain eval --experiment runs/tune/<name> --best --top 3 --data shards/3dpw-test

Protocol (docs/method.md §7): 14 LSP joints regressed from the predicted and ground-truth
meshes with the H36M regressor, both pelvis-aligned; MPJPE, PA-MPJPE, PVE in mm; GT meshes
from the gendered body models when the batch carries genders. Human3.6M protocol 2 is the
same computation on H36M shards of the frontal camera, subjects 9 and 11.

The per-batch computation is `raytrain.eval.protocol.evaluate_batch`, the very function the
training validation (`val_mpjpe` reported to Ray/Tune) runs, over the same loader
(`build_loader(cfg, "val", ...)` without augmentation), so evaluating a checkpoint on its
validation shards reproduces the validation numbers it was saved with.

Output (``out``, default ``<checkpoint or experiment>/eval/<data name>``): metrics.json,
report.md, per_joint.png, overlays/*.png (``raytrain.eval.report``). With several checkpoints
(``--top K``) every one gets a sub-directory and ``out`` holds summary.json + report.md.
"""
import copy
import json
import logging
import posixpath
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from ..body.joints import J14_NAMES
from ..config import ConfigError, ExperimentConfig, config_from_raw, load_config, read_yaml, with_legacy_defaults
from ..data.io import is_remote, isdir, join_url
from ..outputs import claim_output
from ..train.checkpoint import (
    STATE_FILE,
    CheckpointError,
    is_complete,
    list_complete_checkpoints,
    load_checkpoint,
    read_local_commit,
)
from .fetch import (
    StoredCheckpoint,
    fetch_checkpoint,
    remote_checkpoints,
    storage_errors,
    stored_val_mpjpe,
    upload_dir,
)

log = logging.getLogger(__name__)

OVERLAYS = 4


# ----------------------------------------------------------------------------- public API


def run_eval(checkpoint: str | None = None, experiment: str | None = None, best: bool = False,
             top: int = 1, data: str | None = None, out: str | None = None,
             config: str | None = None, max_samples: int = 0, overlays: int = OVERLAYS,
             device: str | None = None, quiet: bool = False, smpl_dir: str | None = None,
             overwrite: bool = False) -> dict:
    """Evaluate one checkpoint (``checkpoint``) or the best / latest of an experiment.

    checkpoint: a checkpoint directory (state.pt + COMMIT.json). experiment: a train or
    tune experiment directory; with ``best`` the checkpoint(s) of lowest stored
    ``val_mpjpe`` (the tuning export ``<experiment>/best/`` when present and top == 1),
    else the latest checkpoint of each trial; ``top`` trials at most. data: shards (any
    form `resolve_shards` accepts). config: a YAML used when the checkpoint stores no
    config. max_samples: cap on evaluated samples (0: all). smpl_dir: the body model to score
    with (never taken from a stored config: a downloaded checkpoint must not choose files
    to read). out follows the output rule (``raytrain.outputs``): refused when not empty
    unless ``overwrite``, locked while written.

    Returns the metrics dict of the first (best) checkpoint, as written to metrics.json,
    plus ``out``; with several checkpoints also ``evaluations`` (one entry each).
    """
    if not data:
        raise ConfigError("eval: --data is required (a shard directory, manifest or pattern)")
    if bool(checkpoint) == bool(experiment):
        raise ConfigError("eval: give exactly one of --checkpoint PATH or --experiment DIR")
    if top < 1:
        raise ConfigError(f"eval: --top must be at least 1, got {top}")
    _check_data(data)
    if checkpoint:
        targets = [checkpoint_target(checkpoint, config)]
    else:
        targets = select_checkpoints(experiment, best=best, top=top, config=config)
    out = out or join_url(checkpoint or experiment, "eval", data_name(data))
    out_dir = Path(tempfile.mkdtemp(prefix="raytrain-eval-")) if is_remote(out) else Path(out)
    from .report import REPORT_FILES, write_report, write_summary_report
    claimed = claim_output(out_dir, overwrite, ours=REPORT_FILES)   # before any model loads
    results = []
    try:
        for rank, target in enumerate(targets):
            name = "" if len(targets) == 1 else f"{rank + 1:02d}-{target.label}"
            cfg = eval_config(target.config, data, max_samples, smpl_dir)
            evaluation = evaluate_checkpoint(cfg, target.path, device=device, overlays=overlays)
            metrics = summarize(evaluation, target, data)
            metrics["out"] = join_url(out, name) if name else out
            write_report(out_dir / name, metrics, evaluation)
            results.append(metrics)
            if not quiet:
                o = metrics["overall"]
                log.info("[eval] %s: MPJPE %.2f mm, PA-MPJPE %.2f mm, PVE %.2f mm over %d samples -> %s",
                         target.origin, o["mpjpe"], o["pa_mpjpe"], o["pve"], o["num_samples"], metrics["out"])
        first = dict(results[0])
        if len(results) > 1:
            write_summary_report(out_dir, results)
            first["evaluations"] = results
            first["out"] = out
        if is_remote(out):
            with storage_errors(out, "write"):
                upload_dir(out_dir, out)
    finally:
        claimed.release()
        if is_remote(out):                       # the local staging of an uploaded report
            shutil.rmtree(out_dir, ignore_errors=True)
    return first


def _check_data(data: str) -> None:
    """--data must be a readable, consistent shard set before any checkpoint is loaded."""
    from ..data.shards import checked_count
    checked_count("--data", data)


@dataclass
class Target:
    """One checkpoint to evaluate and the training config it belongs to; `path` is local
    (a copy for a checkpoint in object storage), `origin` the path or URL the user named."""
    path: Path
    origin: str
    config: ExperimentConfig
    config_source: str
    label: str
    stored_metrics: dict[str, float] = field(default_factory=dict)
    step: int | None = None


@dataclass
class Evaluation:
    """Per-sample results of one checkpoint over a shard set (numpy, mm)."""
    keys: list[str]
    mpjpe: np.ndarray
    pa_mpjpe: np.ndarray
    pve: np.ndarray
    per_joint: np.ndarray          # (N, 14)
    cam_err: np.ndarray            # (N,), NaN where the sample has no camera label
    gendered: bool                 # whether the batches carried per-sample genders
    overlay_samples: list[dict] = field(default_factory=list)
    faces: np.ndarray | None = None
    skipped: dict[str, int] = field(default_factory=dict)  # bad samples not scored, by reason


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_target(path: str, config: str | None) -> Target:
    """A checkpoint directory (a local path, or a URL copied into the local cache first) and
    its training config (``checkpoint_config``); raises ``CheckpointError`` naming what is
    wrong when it is no complete checkpoint."""
    origin = str(path)
    if is_remote(origin):
        with storage_errors(origin):
            path = fetch_checkpoint(origin)      # a copy already checked against its commit record
    else:
        path = Path(path)
        if not is_complete(path):
            found = list_complete_checkpoints(str(path)) if path.is_dir() else []
            hint = (f"; it holds {len(found)} checkpoint(s): use --experiment {path} [--best]"
                    if found else "")
            raise CheckpointError(f"{path} is not a complete checkpoint directory "
                                  f"({STATE_FILE} + COMMIT.json){hint}")
    state = _load_light(path)
    cfg, source = checkpoint_config(path, state, config)
    return Target(path=path, origin=origin, config=cfg, config_source=source, label=_label(PurePosixPath(origin)),
                  stored_metrics=dict(state.get("metrics") or {}), step=state.get("step"))


def _load_light(path: Path) -> dict:
    """The checkpoint state, memory-mapped (tensors are only read when touched)."""
    try:
        return torch.load(path / STATE_FILE, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, TypeError):            # mmap needs the zipfile format
        return load_checkpoint(str(path))


def checkpoint_config(path: Path, state: dict, config: str | None = None):
    """(ExperimentConfig, where it came from) of a checkpoint.

    Order: the explicit ``config`` YAML; the config stored in the checkpoint (JSON text,
    `loop._checkpoint`); ``params.json`` of the Ray trial (``train_loop_config``); a YAML
    beside the checkpoint or one level up (the tuning export's best config).
    """
    stored = state.get("config")
    if config:
        cfg = load_config(config)
        if stored:
            check_same_model(_config(_stored_raw(stored, path), f"{path} (stored)"), cfg, path, config)
        return cfg, str(config)
    if stored:
        return _config(_stored_raw(stored, path), f"{path} (stored)"), f"stored in {path / STATE_FILE}"
    for folder in [path, *list(path.parents)[:3]]:
        params = folder / "params.json"
        if params.is_file():
            try:
                raw = json.loads(params.read_text())
                raw = raw.get("train_loop_config", raw)
                raw = dict(raw.get("config", raw))  # a Ray Train run's loop config holds it
            except (ValueError, TypeError, AttributeError, RecursionError):
                continue
            raw = with_legacy_defaults(raw)
            try:
                return _config(raw, str(params)), str(params)
            except ConfigError:
                pass
    for folder in (path, path.parent):
        for yaml_path in sorted(folder.glob("*.yaml")) + sorted(folder.glob("*.yml")):
            try:
                return _config(read_yaml(str(yaml_path)), str(yaml_path)), str(yaml_path)
            except ConfigError:
                continue
    raise ConfigError(f"{path}: no training config found (not stored in the checkpoint, no "
                      "params.json of a Ray trial, no config YAML beside it); pass config=...")


#: Keys that decide the network a checkpoint's weights belong to (or how its inputs
#: are made): an evaluation config must agree with the checkpoint's on each.
MODEL_KEYS = ("rois.num_rois", "rois.schedule", "model.backbone", "model.fusion", "model.fusion_hidden",
              "model.attention_heads", "model.pe_bands", "model.decoder_iters", "model.decoder_hidden",
              "model.bbox_info_to_decoders", "model.cam_init", "model.proj_dim", "model.proj_hidden",
              "data.crop_size")


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


def _config(raw: dict, where: str) -> ExperimentConfig:
    return config_from_raw(raw, where)


def select_checkpoints(experiment: str, best: bool = False, top: int = 1,
                       config: str | None = None) -> list[Target]:
    """The checkpoints of an experiment to evaluate, best first.

    With ``best`` and top == 1, the tuning export ``<experiment>/best/`` is used when it
    holds a complete checkpoint (its YAML config serves when the checkpoint stores none).
    Otherwise every complete checkpoint below ``experiment`` (outside ``best/`` and
    ``eval/``) is grouped by trial (its parent directory); per trial the checkpoint of
    lowest stored ``val_mpjpe`` (``best``) or the latest one; trials ranked by that
    ``val_mpjpe``; the first ``top``. An experiment in object storage is ranked from the
    checkpoints' commit records (``fetch.remote_checkpoints``); only the chosen ones are
    copied.
    """
    if is_remote(experiment):
        with storage_errors(experiment):
            if not isdir(experiment):
                raise CheckpointError(f"experiment directory {experiment} not found")
            found = remote_checkpoints(experiment, skip={"best", "eval"})
    else:
        root = Path(experiment)
        if not root.is_dir():
            raise CheckpointError(f"experiment directory {root} not found")
        exported = root / "best"
        if best and top == 1 and exported.is_dir():
            found = _local_checkpoints(exported)
            if found:
                yaml_config = config or _exported_config(exported)
                return [checkpoint_target(min(found, key=_by_val_mpjpe).where, yaml_config)]
        found = _local_checkpoints(root, skip={"best", "eval"})
    if not found:
        raise CheckpointError(f"no complete checkpoint below {experiment}")
    return [checkpoint_target(c.where, config) for c in rank_checkpoints(found, best, top)]


def rank_checkpoints(found: list[StoredCheckpoint], best: bool, top: int) -> list[StoredCheckpoint]:
    """Checkpoints (oldest step first) grouped by trial (their parent directory): per trial
    the one of lowest val_mpjpe (`best`) or the latest; trials ranked by that val_mpjpe."""
    by_trial: dict[str, list[StoredCheckpoint]] = {}
    for stored in found:
        by_trial.setdefault(posixpath.dirname(stored.where.rstrip("/")), []).append(stored)
    chosen = [(min(group, key=_by_val_mpjpe) if best else group[-1]) for group in by_trial.values()]
    return sorted(chosen, key=_by_val_mpjpe)[:top]


def _by_val_mpjpe(stored: StoredCheckpoint) -> tuple[float, str]:
    return stored.val_mpjpe, stored.where


def _local_checkpoints(root: Path, skip: set[str] = frozenset()) -> list[StoredCheckpoint]:
    """The complete checkpoints below `root`, oldest step first, outside directories named
    in `skip`; val_mpjpe from each commit record's metrics (from state.pt for a checkpoint
    whose record holds none)."""
    found = []
    for path in list_complete_checkpoints(str(root)):
        if skip & set(path.relative_to(root).parts):
            continue
        commit = read_local_commit(path)
        metrics = commit["metrics"] if "metrics" in commit else _load_light(path).get("metrics")
        found.append(StoredCheckpoint(str(path), commit["step"], stored_val_mpjpe(metrics)))
    return found


def _exported_config(folder: Path) -> str | None:
    yamls = sorted(folder.glob("*.yaml")) + sorted(folder.glob("*.yml"))
    preferred = [p for p in yamls if "config" in p.name] or yamls
    return str(preferred[0]) if preferred else None


def _label(path: Path) -> str:
    text = f"{path.parent.name}-{path.name}"
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)[:80]


def data_name(data: str) -> str:
    """A directory name for a shard source: 'shards/val' -> 'val', 'x/val-{0..3}.tar' -> 'val'."""
    text = str(data).rstrip("/")
    name = text.rsplit("/", 1)[-1]
    if name.endswith(".json"):
        name = text.rsplit("/", 2)[-2] if text.count("/") >= 1 else "data"
    name = name.split("{", 1)[0]
    name = re.sub(r"\.tar$", "", name)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("-_.")
    return name or "data"


# ----------------------------------------------------------------------------- evaluation


def eval_config(cfg: ExperimentConfig, data: str, max_samples: int = 0,
                smpl_dir: str | None = None) -> ExperimentConfig:
    """The training config pointed at ``data`` as its validation set, scored with the body
    model in ``smpl_dir``."""
    cfg = copy.deepcopy(cfg)
    cfg.model.smpl_dir = smpl_dir
    cfg.data.val_shards = str(data)
    cfg.data.max_val_samples = int(max_samples or 0)
    cfg.data.max_bad_fraction = 1.0  # score what is good, report what is not
    return cfg


@torch.no_grad()
def evaluate_checkpoint(cfg: ExperimentConfig, path, device: str | None = None,
                        overlays: int = OVERLAYS) -> Evaluation:
    """Load the checkpoint's weights into the model its config describes and evaluate."""
    from ..body import load_body_model, load_mean_params
    from ..model import build_model
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    body = load_body_model(cfg.model.smpl_dir, genders=("neutral", "male", "female"))
    model = build_model(cfg.model, body_model=body, mean_params=load_mean_params(cfg.model.smpl_dir))
    state = load_checkpoint(str(path), map_location="cpu")
    model.load_state_dict(state["model"])
    model.to(device)
    return evaluate_model(cfg, model, body.to(device), device, overlays=overlays)


def _one_pass(loader):
    """The batches of ``loader``, then its workers stopped (a one-off pass)."""
    try:
        yield from loader
    finally:
        loader.close()


@torch.no_grad()
def evaluate_model(cfg: ExperimentConfig, model, body, device, overlays: int = OVERLAYS,
                   predictor=None) -> Evaluation:
    """Per-sample errors of ``model`` over ``cfg.data.val_shards`` (one process, all samples).

    predictor: optional ``batch -> {vertices, joints_h36m, cam_full (N, M, 3)}`` used instead
    of the model (e.g. ground-truth parameters for the oracle check).
    """
    from ..data.pipeline import build_loader
    from .protocol import evaluate_batch
    loader = build_loader(cfg, "val", 0, 1, epoch=0, skip=0,
                          batch_size=cfg.data.val_batch_size, seed=cfg.seed)
    keys, parts, gendered = [], {k: [] for k in ("mpjpe", "pa_mpjpe", "pve", "per_joint", "cam_err")}, True
    picked, seen_sequences = [], set()
    for batch in _one_pass(loader):
        given = None if predictor is None else {k: v.to(device) for k, v in predictor(batch).items()}
        pred, errors = evaluate_batch(model, body, batch, device, pred=given)
        gendered = gendered and batch.get("gender") is not None
        cam = errors["cam_err"].double().clone()
        cam[~errors["has_cam"]] = float("nan")
        errors = dict(errors, cam_err=cam)
        for name in parts:
            parts[name].append(errors[name].detach().double().cpu().numpy())
        for i, key in enumerate(batch["keys"]):
            # a few overlays: the first sample of each sequence, else every 8th sample
            sequence = sequence_of(key)
            if len(picked) < overlays and (sequence not in seen_sequences or (len(keys) + i) % 8 == 0):
                picked.append(_overlay_sample(batch, pred, errors, i))
            seen_sequences.add(sequence)
        keys.extend(batch["keys"])
    skipped = dict(loader.bad_counts)
    if not keys:
        raise ValueError(f"no samples to evaluate in {cfg.data.val_shards}"
                         + (f" (all bad: {skipped})" if skipped else ""))
    if skipped:
        print(f"[eval] skipped {sum(skipped.values())} bad sample(s) of {cfg.data.val_shards}: "
              f"{skipped}", flush=True)
    arrays = {name: np.concatenate(values) for name, values in parts.items()}
    faces = getattr(body, "faces", None)
    return Evaluation(keys=keys, gendered=gendered, overlay_samples=picked, faces=faces,
                      skipped=skipped, **arrays)


def _overlay_sample(batch, pred, errors, i: int) -> dict:
    """What report.py needs to draw the predicted mesh over RoI 0's crop."""
    return {
        "key": batch["keys"][i],
        "crop": batch["images"][i, 0].permute(1, 2, 0).contiguous().numpy(),   # (S, S, 3) RGB
        "box": batch["boxes"][i, 0].double().numpy(),
        "image_size": batch["image_size"][i].double().numpy(),
        "focal": float(batch["focal"][i]),
        "vertices": pred["vertices"][i].detach().double().cpu().numpy(),
        "cam_full": pred["cam_full"][i, 0].detach().double().cpu().numpy(),
        "keypoints_2d": batch["keypoints_2d"][i].double().numpy() if bool(batch["has_2d"][i]) else None,
        "mpjpe": float(errors["mpjpe"][i]), "pa_mpjpe": float(errors["pa_mpjpe"][i]),
    }


# ----------------------------------------------------------------------------- summaries


def sequence_of(key: str) -> str:
    """`<source>/<sequence>/<frame>/<person>` -> `<sequence>`."""
    parts = key.split("/")
    return parts[1] if len(parts) > 1 else parts[0]


def source_of(key: str) -> str:
    return key.split("/", 1)[0]


def protocol_of(keys: list[str]) -> dict[str, str]:
    """Which published protocol the shard set corresponds to, with a note for the report."""
    sources = sorted({source_of(k).lower() for k in keys})
    if sources and all(("h36m" in s or "human36m" in s or "h3.6m" in s) for s in sources):
        subjects = sorted({m.group(1) for k in keys
                           for m in [re.match(r"[Ss](\d+)", sequence_of(k))] if m})
        note = ("Human3.6M protocol 2: the 3DPW mesh protocol (14 LSP joints from the mesh via the "
                "H36M regressor, pelvis-aligned MPJPE / PA-MPJPE / PVE in mm) on H36M shards of the "
                "frontal camera, subjects 9 and 11.")
        other = [s for s in subjects if s not in ("9", "11")]
        if other:
            note += (f" Warning: the shards also hold subject(s) {', '.join('S' + s for s in other)}; "
                     "protocol 2 uses S9 and S11 only.")
        return {"name": "h36m_p2", "note": note}
    if sources and all("3dpw" in s for s in sources):
        return {"name": "3dpw", "note": (
            "3DPW protocol (docs/method.md §7): 14 LSP joints regressed from the predicted and "
            "ground-truth meshes with the H36M regressor, pelvis-aligned; MPJPE, PA-MPJPE "
            "(similarity Procrustes), PVE in mm.")}
    return {"name": "mesh", "note": (
        f"Mesh protocol of 3DPW (docs/method.md §7) on `{', '.join(sources)}` shards: 14 LSP joints "
        "regressed from the meshes with the H36M regressor, pelvis-aligned; MPJPE, PA-MPJPE, "
        "PVE in mm.")}


def _stats(ev: Evaluation, index) -> dict[str, float]:
    cam = ev.cam_err[index]
    cam = cam[np.isfinite(cam)]
    out = {"mpjpe": float(ev.mpjpe[index].mean()), "pa_mpjpe": float(ev.pa_mpjpe[index].mean()),
           "pve": float(ev.pve[index].mean()), "num_samples": int(np.size(ev.mpjpe[index]))}
    if cam.size:
        out["cam_err"] = float(cam.mean())
    return out


def summarize(ev: Evaluation, target: Target, data: str) -> dict:
    """metrics.json content: overall, per sequence, per joint (mm), and provenance."""
    sequences: dict[str, list[int]] = {}
    for i, key in enumerate(ev.keys):
        sequences.setdefault(sequence_of(key), []).append(i)
    per_joint = ev.per_joint.mean(axis=0)
    stored = {k: float(v) for k, v in target.stored_metrics.items()
              if isinstance(v, (int, float)) and k.startswith("val_")}
    overall = _stats(ev, slice(None))
    out = {
        "units": "mm",
        "protocol": protocol_of(ev.keys),
        "data": str(data),
        "checkpoint": target.origin,
        "step": target.step,
        "config_source": target.config_source,
        "backbone": target.config.model.backbone,
        "num_rois": target.config.rois.num_rois,
        "gendered_gt": ev.gendered,
        "overall": overall,
        "skipped": {"total": sum(ev.skipped.values()), "by_reason": dict(ev.skipped)},
        "per_sequence": {name: _stats(ev, np.asarray(idx)) for name, idx in sorted(sequences.items())},
        "per_joint": {name: float(v) for name, v in zip(J14_NAMES, per_joint)},
        "stored_validation": stored,
    }
    if "val_mpjpe" in stored:
        out["stored_validation"]["val_mpjpe_difference"] = overall["mpjpe"] - stored["val_mpjpe"]
    return out
