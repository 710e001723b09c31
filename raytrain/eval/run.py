"""`raytrain eval`: evaluate checkpoints on a shard set with the 3DPW / H36M mesh protocol.

    raytrain eval --checkpoint runs/demo/ray/demo/<trial>/checkpoint_000003 --data shards/val
    raytrain eval --experiment runs/tune/<name> --best --top 3 --data shards/3dpw-test

Protocol (docs/method.md §7): 14 LSP joints regressed from the predicted and ground-truth
meshes with the H36M regressor, both pelvis-aligned; MPJPE, PA-MPJPE, PVE in mm; GT meshes
from the gendered body models when the batch carries genders. Human3.6M protocol 2 is the
same computation on H36M shards of the frontal camera, subjects 9 and 11.

The per-batch computation is `raytrain.eval.protocol.evaluate_batch`, the very function the
training validation (`val_mpjpe` reported to Ray/Tune) runs, over the same loader
(`Loader(cfg, "val")` without augmentation), so evaluating a checkpoint on its
validation shards reproduces the validation numbers it was saved with.

Output (``out``, default ``<checkpoint or experiment>/eval/<data name>``): metrics.json,
report.md, per_joint.png, overlays/*.png (``raytrain.eval.report``). With several checkpoints
(``--top K``) every one gets a sub-directory and ``out`` holds summary.json + report.md.
"""
import copy
import logging
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..body.joints import J14_NAMES
from ..checkpoints import Target, checkpoint_target, load_trained_model, select_checkpoints, storage_errors
from ..config import ConfigError, ExperimentConfig
from ..data.io import get_fs, is_remote, join_url, upload_dir
from ..outputs import claim_output

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
    out = out or join_url(checkpoint or experiment, "eval", data_name(data))
    if is_remote(out):
        _check_writable(out)
    if checkpoint:
        targets = [checkpoint_target(checkpoint, config)]
    else:
        targets = select_checkpoints(experiment, best=best, top=top, config=config)
    out_dir = Path(tempfile.mkdtemp(prefix="raytrain-eval-")) if is_remote(out) else Path(out)
    from .report import REPORT_FILES, write_report, write_summary_report
    claimed = claim_output(out_dir, overwrite, ours=REPORT_FILES)   # before any model loads
    results = []
    try:
        for rank, target in enumerate(targets):
            name = "" if len(targets) == 1 else f"{rank + 1:02d}-{target.label}"
            cfg = eval_config(target.config, data, max_samples, smpl_dir)
            evaluation = evaluate_checkpoint(cfg, target, device=device, overlays=overlays)
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


def _check_writable(out: str) -> None:
    """A report in object storage: the bucket must exist and take a write before anything
    is evaluated (a probe object, removed again); ConfigError naming --out otherwise."""
    from ..data.io import storage_error_hint
    probe = join_url(out, ".raytrain-write-check")
    try:
        fs, path = get_fs(probe)
        fs.pipe_file(path, b"")
        fs.rm_file(path)
    except Exception as err:  # noqa: BLE001 - the backends' errors share no base class
        reason = storage_error_hint(out, err) or f"{type(err).__name__}: {str(err)[:200]}"
        raise ConfigError(f"--out {out}: cannot write there ({reason})") from None


def _check_data(data: str) -> None:
    """--data must be a readable, consistent shard set before any checkpoint is loaded."""
    from ..data.shards import checked_count
    checked_count("--data", data)


@dataclass
class Evaluation:
    """Per-sample results of one checkpoint over a shard set (numpy, mm)."""
    keys: list[str]
    mpjpe: np.ndarray
    pa_mpjpe: np.ndarray
    pve: np.ndarray
    per_joint: np.ndarray          # (N, 14)
    cam_err: np.ndarray            # (N,), NaN where the sample has no camera label
    scale_ratio: np.ndarray        # (N,) predicted / true crop-camera scale, NaN as cam_err
    const_cam_err: np.ndarray      # (N,) camera error of the constant camera, NaN as cam_err
    gendered: bool                 # whether the batches carried per-sample genders
    overlay_samples: list[dict] = field(default_factory=list)
    faces: np.ndarray | None = None
    skipped: dict[str, int] = field(default_factory=dict)  # bad samples not scored, by reason
    const_cam: list[float] = field(default_factory=list)   # the constant camera (s, tx, ty), [] without labels


# ----------------------------------------------------------------------------- names


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
def evaluate_checkpoint(cfg: ExperimentConfig, target: Target, device: str | None = None,
                        overlays: int = OVERLAYS) -> Evaluation:
    """Evaluate the trained network of ``target`` on ``cfg``'s validation shards, scored
    with the body model of ``cfg.model.smpl_dir``."""
    from ..body import load_body_model
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    body = load_body_model(cfg.model.smpl_dir, genders=("neutral", "male", "female")).to(device)
    model = load_trained_model(target, device, body_model=body)
    return evaluate_model(cfg, model, body, device, overlays=overlays)


def _one_pass(loader):
    """The batches of one epoch of ``loader``, then its workers stopped (a one-off pass)."""
    with loader:
        yield from loader.epoch(0)


@torch.no_grad()
def evaluate_model(cfg: ExperimentConfig, model, body, device, overlays: int = OVERLAYS,
                   predictor=None) -> Evaluation:
    """Per-sample errors of ``model`` over ``cfg.data.val_shards`` (one process, all samples).

    predictor: optional ``batch -> {vertices, joints_h36m, cam_full (N, M, 3)}`` used instead
    of the model (e.g. ground-truth parameters for the oracle check).
    """
    from ..data.pipeline import Loader
    from .protocol import evaluate_batch
    loader = Loader(cfg, "val")
    names = ("mpjpe", "pa_mpjpe", "pve", "per_joint", "cam_err", "scale_ratio")
    keys, parts, cameras, gendered = [], {k: [] for k in names}, [], True
    picked, seen_sequences = [], set()
    for batch in _one_pass(loader):
        given = None if predictor is None else {k: v.to(device) for k, v in predictor(batch).items()}
        pred, errors = evaluate_batch(model, body, batch, device, pred=given)
        gendered = gendered and batch.get("gender") is not None
        no_cam = ~errors["has_cam"]
        errors = dict(errors, cam_err=errors["cam_err"].double().masked_fill(no_cam, float("nan")),
                      scale_ratio=errors["scale_ratio"].double().masked_fill(no_cam, float("nan")))
        cameras.append((batch["cam_full"], batch["boxes"][:, 0], batch["image_size"], batch["focal"], no_cam))
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
        raise ConfigError(f"--data {cfg.data.val_shards}: no sample to evaluate"
                          + (f" (all {sum(skipped.values())} bad: {skipped}; not raytrain shards?)"
                             if skipped else ""))
    if skipped:
        print(f"[eval] skipped {sum(skipped.values())} bad sample(s) of {cfg.data.val_shards}: "
              f"{skipped}", flush=True)
    arrays = {name: np.concatenate(values) for name, values in parts.items()}
    arrays["const_cam_err"], const_cam = constant_camera_errors(cameras)
    faces = getattr(body, "faces", None)
    return Evaluation(keys=keys, gendered=gendered, overlay_samples=picked, faces=faces,
                      skipped=skipped, const_cam=const_cam, **arrays)


def constant_camera_errors(cameras: list[tuple]) -> tuple[np.ndarray, list[float]]:
    """Per-sample error (mm, NaN without a camera label) of the constant camera, the median
    crop camera of the evaluated set itself (a checkpoint's config does not choose files to
    read, so the training split is not consulted), and that camera (s, tx, ty).
    cameras: per batch (cam_full (N, 3), RoI-0 boxes (N, 3), image_size (N, 2), focal (N,), no_cam (N,))."""
    from .protocol import constant_camera_error, median_crop_camera
    cam, boxes, size, focal, no_cam = (torch.cat(parts) for parts in zip(*cameras))
    errors = torch.full((len(cam),), float("nan"), dtype=torch.float64)
    if no_cam.all():
        return errors.numpy(), []
    has = ~no_cam
    const = median_crop_camera(cam[has], boxes[has], size[has], focal[has])
    errors[has] = constant_camera_error(const, cam[has], boxes[has], size[has], focal[has])
    return errors.numpy(), const.tolist()


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
        out["const_cam_err"] = float(np.nanmean(ev.const_cam_err[index]))
        out["scale_ratio"] = float(np.nanmean(ev.scale_ratio[index]))
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
        "constant_camera": {"crop_cam": ev.const_cam, "from": "the median crop camera of --data"},
        "skipped": {"total": sum(ev.skipped.values()), "by_reason": dict(ev.skipped)},
        "per_sequence": {name: _stats(ev, np.asarray(idx)) for name, idx in sorted(sequences.items())},
        "per_joint": {name: float(v) for name, v in zip(J14_NAMES, per_joint)},
        "stored_validation": stored,
    }
    if "val_mpjpe" in stored:
        out["stored_validation"]["val_mpjpe_difference"] = overall["mpjpe"] - stored["val_mpjpe"]
    return out
