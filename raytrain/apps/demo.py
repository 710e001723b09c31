"""`raytrain demo` / `make demo`: the user story on the embedded default, on this machine.

1. shard synthetic people (train / val) rendered with the synthetic SMPL-format body model;
2. a mean-pose baseline on the validation set and the untrained network's metrics;
3. Ray Train (local in-process Ray, DDP-ready loop) on the demo config;
4. the validation metrics after training, written to <out>/summary.json;
5. a small Ray Tune sweep (4 trials, Optuna TPE, ASHA) with its best-trial export;
6. a synthetic release in 3DPW's on-disk format, converted by datasets/shard_3dpw.py, and
   `raytrain eval` of the best trial and of the demo model on it: <out>/report/.
"""
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from ..config import load_config, shipped_config, shipped_space
from ..synthetic.body_model import with_default_body_model

log = logging.getLogger(__name__)

DEMO_CONFIG = shipped_config("demo")

# The demo's synthetic people [demo choice]: easier than the default distribution, so that a
# 0.6 M-parameter CPU network trained from scratch for a few minutes learns pose from the
# image. With the full distribution (any heading, every joint angle independent and uniform
# inside its limits) such a run only learns the mean pose: the pose loss stays at the
# constant predictor's level and PA-MPJPE ends at or above the mean-pose baseline.
#   - body poses: one of DEMO_POSE_MODES prototypes (drawn once, uniformly inside the joint
#     limits) plus +-DEMO_POSE_JITTER of every joint's limit interval ("a few actions,
#     performed with variation"); the mean pose is as far from these samples as from the
#     full distribution's (baseline PA-MPJPE ~160 mm vs ~165 mm);
#   - heading within +-DEMO_HEADING_DEG of facing the camera (default: any heading) and
#     half the default pitch/roll.
# Shape, camera, image size, box, light and background keep their default ranges. The
# mean-pose baseline is computed on the same distribution (its own training shards).
DEMO_POSE_MODES = 8
DEMO_POSE_JITTER = 0.1
DEMO_HEADING_DEG = 15.0
DEMO_TILT_SCALE = 0.5


def demo_synthetic_config(crop_size: int):
    """The SyntheticConfig of the demo shards (stored at the demo's crop resolution)."""
    import math

    from ..synthetic.people import SyntheticConfig
    return SyntheticConfig(crop_size=crop_size, heading_range=math.radians(DEMO_HEADING_DEG),
                           tilt_scale=DEMO_TILT_SCALE, pose_modes=DEMO_POSE_MODES,
                           pose_mode_jitter=DEMO_POSE_JITTER)


def run_demo(out: str = "runs/demo", quick: bool = False, config: str = None):
    t0 = time.perf_counter()
    out_dir = Path(out).resolve()
    n_train, n_val = (160, 48) if quick else (1600, 200)
    overrides = [f"data.train_shards={out_dir / 'shards/train'}",
                 f"data.val_shards={out_dir / 'shards/val'}",
                 f"train.storage_path={out_dir / 'ray'}", "name=demo"]
    if quick:
        overrides += ["optim.max_steps=6", "train.val_every=6", "train.checkpoint_every=6",
                      "train.log_every=2"]
    cfg = with_default_body_model(load_config(config or str(DEMO_CONFIG), overrides))
    previous = out_dir / "ray"
    if previous.exists():  # a finished run of the same name would be resumed, not retrained
        log.info(f"  removing the previous demo run in {previous}")
        shutil.rmtree(previous)
    _step(f"1/6 sharding {n_train} + {n_val} synthetic people into {out_dir / 'shards'}")
    synthetic = demo_synthetic_config(cfg.data.crop_size)
    from ..synthetic.people import ensure_synthetic_shards
    for name, n, seed in (("train", n_train, 1), ("val", n_val, 2)):
        workers = max(1, min(2, os.cpu_count() or 1, n // 200))
        ensure_synthetic_shards(out_dir / "shards" / name, n, seed, synthetic, workers=workers)

    _step("2/6 baselines on the validation set")
    baseline = mean_pose_baseline(cfg)
    from ..eval.protocol import split_constant_camera_error, split_crop_camera
    const_cam = split_crop_camera(cfg.data.train_shards)      # the train split's median crop camera
    const_cam_err = split_constant_camera_error(const_cam, cfg.data.val_shards)
    before = evaluate_untrained(cfg)
    log.info(f"  mean-pose baseline: PA-MPJPE {baseline['pa_mpjpe']:.1f} mm, MPJPE {baseline['mpjpe']:.1f} mm")
    log.info(f"  constant camera (the train split's median crop camera): camera error {const_cam_err:.0f} mm")
    log.info(f"  untrained network:  PA-MPJPE {before['val_pa_mpjpe']:.1f} mm, MPJPE {before['val_mpjpe']:.1f} mm")

    _step(f"3/6 training {cfg.model.backbone} with Ray Train ({cfg.ray.num_workers} worker)")
    from ..train.launch import run_training
    result = run_training(cfg)
    if result.error is not None:
        raise SystemExit(f"demo training failed: {result.error}")
    after = {k: v for k, v in result.metrics.items() if k.startswith("val_")}

    _step("4/6 results")
    summary = {
        "baseline_pa_mpjpe_mm": baseline["pa_mpjpe"], "baseline_mpjpe_mm": baseline["mpjpe"],
        "untrained_pa_mpjpe_mm": before["val_pa_mpjpe"],
        "pa_mpjpe_mm": after.get("val_pa_mpjpe"), "mpjpe_mm": after.get("val_mpjpe"),
        "pve_mm": after.get("val_pve"), "cam_err_mm": after.get("val_cam_err"),
        "const_cam_err_mm": const_cam_err, "scale_ratio": after.get("val_scale_ratio"),
        "const_cam": const_cam,
        "improvement_over_baseline": 1 - after["val_pa_mpjpe"] / baseline["pa_mpjpe"],
        "train_persons_per_s": result.metrics.get("train_persons_per_s"),
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "seconds": round(time.perf_counter() - t0, 1),
        "train_persons": n_train, "val_persons": n_val,
        "synthetic": {"pose_modes": DEMO_POSE_MODES, "pose_mode_jitter": DEMO_POSE_JITTER,
                      "heading_range_deg": DEMO_HEADING_DEG, "tilt_scale": DEMO_TILT_SCALE},
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    log.info(f"  PA-MPJPE {summary['pa_mpjpe_mm']:.1f} mm after training vs {summary['baseline_pa_mpjpe_mm']:.1f} mm "
          f"for the mean pose ({100 * summary['improvement_over_baseline']:.0f}% lower); "
          f"MPJPE {summary['mpjpe_mm']:.1f} mm, PVE {summary['pve_mm']:.1f} mm")
    log.info(f"  camera error {summary['cam_err_mm']:.0f} mm vs {const_cam_err:.0f} mm for the constant camera "
             f"(predicted / true scale {summary['scale_ratio']:.3f})")

    _step("5/6 sweep: 4 short trials over lr and lambda_cam (Optuna TPE + ASHA)")
    experiment = demo_sweep(cfg, quick)
    _step("6/6 evaluation on a synthetic 3DPW-format test set")
    shards_3dpw = demo_3dpw_set(out_dir, synthetic, quick, cfg.model.smpl_dir)
    from ..eval.run import run_eval
    best = run_eval(experiment=str(experiment), best=True, data=str(shards_3dpw),
                    out=str(out_dir / "report" / "best-trial"), quiet=True, smpl_dir=cfg.model.smpl_dir,
                    overwrite=True)
    model = run_eval(checkpoint=summary["checkpoint"], data=str(shards_3dpw),
                     out=str(out_dir / "report" / "demo-model"), quiet=True, smpl_dir=cfg.model.smpl_dir,
                     overwrite=True)
    summary.update({
        "sweep": str(experiment), "sweep_best": str(experiment / "best"),
        "3dpw_format_best_trial": best["overall"], "3dpw_format_demo_model": model["overall"],
        "reports": [str(out_dir / "report" / "best-trial" / "report.md"),
                    str(out_dir / "report" / "demo-model" / "report.md")],
        "seconds": round(time.perf_counter() - t0, 1),
    })
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    log.info(f"  best sweep trial on the 3DPW-format set: MPJPE {best['overall']['mpjpe']:.1f} mm, "
          f"PA-MPJPE {best['overall']['pa_mpjpe']:.1f} mm")
    log.info(f"  demo model on the 3DPW-format set:       MPJPE {model['overall']['mpjpe']:.1f} mm, "
          f"PA-MPJPE {model['overall']['pa_mpjpe']:.1f} mm")
    log.info(f"  reports: {out_dir / 'report'}/*/report.md; sweep plots: {experiment / 'best'}")
    log.info(f"  summary: {out_dir / 'summary.json'} ({summary['seconds']:.0f} s in all)")
    return summary


def _step(text):
    log.info("[demo] %s", text)


@torch.no_grad()
def mean_pose_baseline(cfg, per_person: bool = False):
    """Predict the training set's mean body pose and shape for every validation person;
    with `per_person`, also every person's errors in key order (`per_person`)."""
    from ..body import load_body_model
    from ..data.reader import ShardReader
    from ..eval.protocol import mesh_protocol
    body = load_body_model(cfg.model.smpl_dir, genders=("neutral", "male", "female"))
    poses, betas = [], []
    for sample in ShardReader(cfg.data.train_shards, shuffle=False, decode_images=False):
        poses.append(torch.as_tensor(sample.pose))
        betas.append(torch.as_tensor(sample.betas))
    mean_pose, mean_betas = torch.stack(poses).mean(0), torch.stack(betas).mean(0)
    rows = {"mpjpe": [], "pa_mpjpe": []}
    val = sorted(ShardReader(cfg.data.val_shards, shuffle=False, decode_images=False), key=lambda s: s.key)
    for start in range(0, len(val), 64):
        chunk = val[start:start + 64]
        gt_pose = torch.stack([torch.as_tensor(s.pose) for s in chunk])
        gt_betas = torch.stack([torch.as_tensor(s.betas) for s in chunk])
        gt = body.forward_axis_angle(gt_pose, gt_betas, gender=[s.gender for s in chunk])
        pred_pose = mean_pose.expand_as(gt_pose).clone()
        pred_pose[:, :3] = gt_pose[:, :3]        # global orientation does not matter after PA
        pred = body.forward_axis_angle(pred_pose, mean_betas.expand_as(gt_betas))
        errors = mesh_protocol(pred.joints_h36m, gt.joints_h36m, pred.vertices, gt.vertices)
        for key in rows:
            rows[key] += errors[key].double().tolist()
    out = {key: sum(values) / max(len(values), 1) for key, values in rows.items()}
    if per_person:
        out["per_person"] = {key: [round(v, 3) for v in values] for key, values in rows.items()}
    return out


def evaluate_untrained(cfg):
    """Validation metrics of the freshly initialised network (bare, one process)."""
    from ..body import load_body_model
    from ..eval.protocol import validate
    from ..train.loop import initial_network
    from ..train.session import BareSession
    body = load_body_model(cfg.model.smpl_dir, genders=("neutral", "male", "female"))
    torch.manual_seed(cfg.seed)
    model = initial_network(cfg, body)
    with tempfile.TemporaryDirectory() as run_dir:  # validate writes nothing there
        session = BareSession(run_dir, device="cpu")
        return validate(cfg, model, body, session, session.device)  # its loader: this pass only


# ----------------------------------------------------------------------------- sweep and report

DEMO_SPACE = shipped_space("demo")


def demo_sweep(cfg, quick: bool):
    """Four short trials over the learning rate and lambda_cam, ASHA stopping the weak ones."""
    from ..config import from_dict, to_dict
    from ..tuning.driver import run_tune
    from ..tuning.experiment import experiment_dir
    steps = 4 if quick else 20
    raw = to_dict(cfg)
    raw.update(name="demo-sweep")
    raw["optim"].update(max_steps=steps)
    raw["train"].update(val_every=max(1, steps // 4), checkpoint_every=max(1, steps // 4))
    raw["ray"].update(cpus_per_worker=0.9)            # + 0.1 per trial driver: 2 trials at once
    raw["data"].update(max_val_samples=64)
    sweep_cfg = from_dict(type(cfg), raw, prefix="")
    run_tune(sweep_cfg, str(DEMO_SPACE), trials=4, settings={"max_concurrent_trials": 2})
    return Path(experiment_dir(sweep_cfg))


def demo_3dpw_set(out_dir: Path, synthetic, quick: bool, smpl_dir: str) -> Path:
    """A synthetic release in 3DPW's on-disk format, converted by the 3DPW converter."""
    from ..data.convert.pw3d import convert_3dpw
    from ..synthetic.pw3d_release import write_synthetic_3dpw
    root, shards = out_dir / "3DPW", out_dir / "shards" / "3dpw-test"
    if not (shards / "manifest.json").exists():
        write_synthetic_3dpw(str(root), split="test", sequences=2 if quick else 4,
                             frames=4 if quick else 12, pose_cfg=synthetic)
        convert_3dpw(str(root), "test", str(shards), smpl_dir=smpl_dir, workers=1, progress=False,
                     printer=None)
    return shards
