"""`raytrain bench train`: persons/s of one training loop, bare and under Ray Train.

Both runs use the same config, data path (synthetic shards through `pipeline.Loader`),
torch threads (`ray.cpus_per_worker`) and number of steps; throughput counts training
steps only (validation and checkpoints are paused out, see `loop.Throughput`). Runs are
interleaved (bare, ray, bare, ray, ...) and the medians are compared.
"""
import statistics
import tempfile
import time

from ..config import load_config, shipped_config
from ..connect import connect_ray

DEMO_CONFIG = shipped_config("demo")


def bench_shards(n_train: int, n_val: int = 16) -> tuple:
    """Synthetic shards for the bench, cached under $RAYTRAIN_HOME/bench."""
    from ..body.model import raytrain_home
    from ..synthetic.people import ensure_synthetic_shards
    root = raytrain_home() / "bench" / f"synthetic-{n_train}"
    return (ensure_synthetic_shards(root / "train", n_train, seed=1, maxcount=256),
            ensure_synthetic_shards(root / "val", n_val, seed=2, maxcount=256))


def bench_config(train: str, val: str, steps: int, run_dir: str, extra=()):
    from ..synthetic.body_model import with_default_body_model
    return with_default_body_model(load_config(str(DEMO_CONFIG), [
        f"data.train_shards={train}", f"data.val_shards={val}", f"optim.max_steps={steps}",
        f"train.val_every={steps}", f"train.checkpoint_every={steps}", f"train.log_every={steps}",
        "train.tensorboard=false", "data.max_val_samples=16", "ray.num_workers=1",
        "ray.cpus_per_worker=1", "ray.num_cpus=2", f"train.storage_path={run_dir}", "name=bench",
        *extra]))


def bare_rate(cfg, run_dir: str) -> float:
    from ..train.loop import run_loop
    from ..train.session import BareSession
    return run_loop(cfg, BareSession(run_dir, device="cpu"))["train_persons_per_s"]


def ray_rate(cfg) -> float:
    from ..train.launch import build_trainer, raise_if_run_stopped
    result = build_trainer(cfg).fit()
    raise_if_run_stopped(cfg)
    if result.error is not None:
        raise RuntimeError(f"Ray Train run failed: {result.error}")
    return result.metrics["train_persons_per_s"]


def run_train_bench(quick: bool = False, repeats: int = None, steps: int = None, extra=()) -> dict:
    repeats = repeats or (1 if quick else 3)
    steps = steps or (10 if quick else 60)
    if quick:  # a small flavour so the whole comparison fits in a minute on 2 cores
        extra = ("model.backbone=mobilenetv3_small_050", "data.crop_size=64",
                 "data.batch_size=8", *extra)
    train, val = bench_shards(64 if quick else 256)
    bare, on_ray = [], []
    t0 = time.perf_counter()
    connect_ray(num_cpus=2, log_to_driver=False)
    with tempfile.TemporaryDirectory(prefix="raytrain-bench-") as tmp:
        for i in range(repeats):
            cfg = bench_config(train, val, steps, tmp, [f"name=bench-{i}", *extra])
            bare.append(bare_rate(cfg, f"{tmp}/bare-{i}"))
            on_ray.append(ray_rate(cfg))
    result = {"bare_persons_per_s": statistics.median(bare), "ray_persons_per_s": statistics.median(on_ray)}
    result["ratio"] = result["ray_persons_per_s"] / result["bare_persons_per_s"]
    result.update({"repeats": repeats, "steps": steps, "batch_size": cfg.data.batch_size,
                   "backbone": cfg.model.backbone, "crop_size": cfg.data.crop_size,
                   "num_rois": cfg.rois.num_rois, "bare_runs": bare, "ray_runs": on_ray,
                   "seconds": round(time.perf_counter() - t0, 1)})
    return result
