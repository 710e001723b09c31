"""`raytrain study`: the paper's claims, one or more seeds each, on a synthetic benchmark.

    raytrain study                                  # the four claim variants, 1 seed, 10,000 steps
    raytrain study --variants cliff,m5,m5_cam,full --seeds 3
    raytrain study --heading 180 --pose-scale 0.6   # the hard benchmark (its own splits)
    raytrain study --quick                          # a small flavour (the test suite runs it)

Every (variant, seed) run trains with the same budget: the bare training loop (one process,
one torch thread, no Ray; `train.loop.run_loop` with a `BareSession`) on the benchmark's
fixed train split (`synthetic/hard.py`, rendered once and reused by every run), then the
test split is scored with the validation protocol plus the camera quantities the paper's
claims are about: full-camera translation error of RoI 0 beside the constant camera's (the
train split's median crop camera) and the predicted / true scale ratio, its depth
component, and the disagreement of the RoIs' full cameras. Every run records its learning
curve (the val split scored every `steps / CURVE_POINTS` steps; a checkpoint every quarter
of the run, where an interrupted run resumes) and its per-person test errors, so that claims are judged
with per-person paired differences on the same test people beside the seed spread.
Runs go `--parallel` at a time, each in its own process. `<out>/results.json` is rewritten
after every finished run; a rerun skips the (variant, seed) runs it holds with the same
settings. Then `<out>/table.md`, `<out>/study.png` and `<out>/curves.png` are written from
results.json.
"""
import argparse
import hashlib
import json
import math
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from ..config import ConfigError, load_config, named_file
from ..numeric import is_finite_number as _finite
from ..train.session import BareSession

#: Split sizes, step budget, variants and seeds: the full study and the quick flavour of the
#: test suite. A network learns pose from the image once it sees >= 20,000 distinct people:
#: with 1,536 it memorises them and ends worse than the mean pose (docs/study.md).
FULL = {"sizes": {"train": 24000, "val": 200, "test": 300}, "steps": 10000,
        "variants": ["cliff", "m5", "m5_cam", "full"], "seeds": 1}
QUICK = {"sizes": {"train": 24, "val": 8, "test": 8}, "steps": 2,
         "variants": ["cliff", "m5_cam", "full"], "seeds": 2,
         "overrides": ("data.batch_size=8", "data.crop_size=64")}   # a batch from 24 people, fast
#: The default benchmark: the hard one narrowed to headings within +-30 degrees and body
#: joints within 30 % of their limits, where a CPU-trained network learns pose.
STUDY_HEADING_DEG, STUDY_POSE_SCALE = 30.0, 0.3
#: Points of every run's learning curve (the val split scored every steps / CURVE_POINTS).
CURVE_POINTS = 20
METRICS = ("mpjpe", "pa_mpjpe", "pve", "cam_err", "cam_depth_err", "roi_cam_spread")
#: Shown beside the camera error: the constant camera's error and the scale ratio.
CAMERA_BASELINES = ("const_cam_err", "scale_ratio")
LABELS = {"mpjpe": "MPJPE", "pa_mpjpe": "PA-MPJPE", "pve": "PVE", "cam_err": "camera error",
          "const_cam_err": "constant camera", "scale_ratio": "scale ratio",
          "cam_depth_err": "camera depth error", "roi_cam_spread": "RoI camera disagreement"}
COLUMNS = ("mpjpe", "pa_mpjpe", "pve", "cam_err", *CAMERA_BASELINES, "cam_depth_err", "roi_cam_spread")

#: The paper's claims as (claim, variant without, variant with, metrics that should drop).
CLAIMS = (
    ("more RoIs help (M = 1 -> M = 5, no new losses)", "cliff", "m5",
     ("mpjpe", "pa_mpjpe", "pve", "cam_err")),
    ("L_cam gives more accurate cameras and meshes", "m5", "m5_cam",
     ("cam_err", "cam_depth_err", "roi_cam_spread", "mpjpe", "pa_mpjpe", "pve")),
    ("L_cont helps on top of L_cam (paper's setting)", "m5_cam", "full", METRICS),
)


# ----------------------------------------------------------------------------- driver

def run_study(config: str | None = None, space: str | None = None, variants: list[str] | None = None,
              seeds: int | None = None, steps: int | None = None, out: str = "docs/study",
              work: str = "runs/study", parallel: int | None = None, quick: bool = False,
              overrides: tuple = (), device: str = "cpu", heading_deg: float | None = None,
              pose_scale: float | None = None) -> dict:
    """Train every (variant, seed) missing from `<out>/results.json`, then write the report."""
    from ..tuning.space import load_space
    budget = QUICK if quick else FULL
    parallel = parallel or (1 if quick else 2)
    steps = steps or budget["steps"]
    seeds = seeds or budget["seeds"]
    overrides = (*budget.get("overrides", ()), *overrides)
    shown = {"config": config or "study", "space": space or "study"}  # as given: results.json records them
    config, space = named_file(shown["config"], "configs"), named_file(shown["space"], "spaces")
    base = load_config(config, list(overrides))
    variant_sets = load_space(space, base).variants
    variants = list(variants or budget.get("variants") or variant_sets)
    try:
        if torch.device(device).type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: torch sees no CUDA device here")
    except RuntimeError as err:  # not a device string torch knows
        raise ConfigError(f"--device {device}: {err}") from None
    from ..synthetic.hard import ensure_hard_splits
    heading_deg = STUDY_HEADING_DEG if heading_deg is None else heading_deg
    pose_scale = STUDY_POSE_SCALE if pose_scale is None else pose_scale
    if not (0 < heading_deg <= 180 and 0 < pose_scale <= 1):
        raise ConfigError(f"--heading must be in (0, 180] degrees and --pose-scale in (0, 1], "
                          f"got {heading_deg:g} and {pose_scale:g}")
    unknown = [v for v in variants if v not in variant_sets]
    if unknown:
        raise ConfigError(f"--variants: unknown variant(s) {unknown}; {space} has {list(variant_sets)}")
    out_dir, work_dir = Path(out), Path(work)
    out_dir.mkdir(parents=True, exist_ok=True)
    shard_dir = work_dir / f"shards-h{heading_deg:g}-p{pose_scale:g}"
    _say(f"rendering / reusing the benchmark's splits {budget['sizes']} under {shard_dir}")
    shards = ensure_hard_splits(shard_dir, budget["sizes"], base.data.crop_size, workers=parallel,
                                heading_deg=heading_deg, pose_scale=pose_scale)
    benchmark = {"heading_deg": heading_deg, "pose_scale": pose_scale}
    base_key = _digest({"config": Path(config).read_text(), "overrides": list(overrides),
                        "steps": steps, "sizes": budget["sizes"], **benchmark})
    results = load_results(out_dir / "results.json")
    keys = {v: _digest({"base": base_key, "variant": variant_sets[v]}) for v in variants}
    done = {(r["variant"], r["seed"]) for r in results["runs"] if keys.get(r["variant"]) == r["settings"]}
    results["runs"] = [r for r in results["runs"] if r["variant"] not in keys or keys[r["variant"]] == r["settings"]]
    if results.get("baseline_settings") != base_key:
        _say("mean-pose and constant-camera baselines on the test split")
        results["baseline"] = test_baseline(config, overrides, shards)
        results["baseline_settings"] = base_key
    common = {"config": config, "overrides": list(overrides), "steps": steps, "sizes": budget["sizes"],
              "shards": shards, "device": device, "const_cam": results["baseline"].get("const_cam")}
    results["settings"] = {"steps": steps, "sizes": budget["sizes"], **shown, "overrides": list(overrides),
                           "seeds": seeds,
                           "crop_size": base.data.crop_size, "batch_size": base.data.batch_size,
                           **benchmark}
    write_results(out_dir / "results.json", results)
    # seed by seed: a study stopped early has every variant at (about) the same number of seeds
    jobs = [(v, s) for s in range(seeds) for v in variants if (v, s) not in done]
    from ..train.launch import prepare
    for variant in dict.fromkeys(v for v, _ in jobs):  # the pre-flight of every training command
        prepare(run_config(dict(common, variant=variant, seed=0, space=space, run_dir=str(work_dir / "runs"))),
                start_ray=False)
    _say(f"{len(jobs)} runs to train ({len(done)} already in {out_dir / 'results.json'}), "
         f"{parallel} at a time, {steps} steps each")
    for record in run_jobs(jobs, common, space, work_dir / "runs", parallel):
        record["settings"] = keys[record["variant"]]
        results["runs"].append(record)
        write_results(out_dir / "results.json", results)
        shown = " ".join(f"{k}={record[k]:.1f}" for k in METRICS if _finite(record.get(k)))
        _say(f"{record['variant']} seed {record['seed']}: {shown} ({record['seconds']:.0f} s)")
    write_report(results, out_dir)
    return results


def run_jobs(jobs: list[tuple[str, int]], common: dict, space: str, runs_dir: Path, parallel: int):
    """Run (variant, seed) jobs, `parallel` processes at a time (1: one after the other in this
    process, which saves each run's start-up); yield each finished record."""
    if parallel == 1:
        for variant, seed in jobs:
            spec = _prepare(variant, seed, common, space, runs_dir)
            yield run_one(str(spec))
        return
    pending, running = list(jobs), []
    while pending or running:
        while pending and len(running) < parallel:
            variant, seed = pending.pop(0)
            running.append(_start(variant, seed, common, space, runs_dir))
        time.sleep(0.5)
        for job in [j for j in running if j["process"].poll() is not None]:
            running.remove(job)
            job["log"].close()
            result = job["dir"] / "result.json"
            if job["process"].returncode != 0 or not result.exists():
                _say(f"{job['variant']} seed {job['seed']} failed (exit {job['process'].returncode}); "
                     f"see {job['dir'] / 'log.txt'}")
                continue
            yield json.loads(result.read_text())


def _prepare(variant: str, seed: int, common: dict, space: str, runs_dir: Path) -> Path:
    """The run directory with the run's spec.json; returns the spec's path. A directory left
    by an interrupted run of the same spec is kept (the run resumes from its checkpoint),
    any other is emptied (the bare session would resume a leftover checkpoint)."""
    run_dir = runs_dir / f"{variant}-s{seed}"
    spec = dict(common, variant=variant, seed=seed, space=space, run_dir=str(run_dir))
    text = json.dumps(spec, indent=2)
    stored = run_dir / "spec.json"
    if run_dir.exists() and not (stored.exists() and stored.read_text() == text):
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    stored.write_text(text)
    return stored


def _start(variant: str, seed: int, common: dict, space: str, runs_dir: Path) -> dict:
    spec = _prepare(variant, seed, common, space, runs_dir)
    log = open(spec.parent / "log.txt", "w")
    process = subprocess.Popen([sys.executable, "-m", "raytrain.apps.study", "--run", str(spec)],
                               stdout=log, stderr=subprocess.STDOUT)
    return {"variant": variant, "seed": seed, "dir": spec.parent, "process": process, "log": log}


# ----------------------------------------------------------------------------- one run

def run_config(spec: dict):
    """The experiment config of one (variant, seed) run."""
    from ..synthetic.body_model import with_default_body_model
    from ..tuning.space import VARIANT_KEY, load_space
    steps, shards = spec["steps"], spec["shards"]
    every = max(1, steps // CURVE_POINTS)
    cfg = load_config(spec["config"], [
        *spec["overrides"], f"data.train_shards={shards['train']}", f"data.val_shards={shards['val']}",
        f"seed={spec['seed']}", f"optim.max_steps={steps}", f"train.val_every={every}",
        f"train.checkpoint_every={max(every, steps // 4)}", f"train.storage_path={spec['run_dir']}",
        f"name={spec['variant']}-s{spec['seed']}", "ray.cpus_per_worker=1"])
    cfg = load_space(spec["space"], cfg).trial_config(cfg, {VARIANT_KEY: spec["variant"]})
    return with_default_body_model(cfg)


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the loader workers)."""
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                  resource.getrusage(resource.RUSAGE_CHILDREN)))


def run_one(spec_path: str) -> dict:
    """Train one (variant, seed) run bare, score it on the test split, write result.json."""
    from ..train.loop import run_loop
    spec = json.loads(Path(spec_path).read_text())
    cfg = run_config(spec)
    t0, cpu0 = time.perf_counter(), _cpu_seconds()
    session = CurveSession(spec["run_dir"], device=spec.get("device", "cpu"))
    val = run_loop(cfg, session)
    train_seconds = time.perf_counter() - t0
    metrics = evaluate_split(cfg, session.model, spec["shards"]["test"], torch.device(session.device),
                             const_cam=spec.get("const_cam"))
    losses = next((r for r in reversed(session.reports) if any(k.startswith("loss_") for k in r)), {})
    record = {"variant": spec["variant"], "seed": spec["seed"], **metrics,
              "val_pa_mpjpe": val.get("val_pa_mpjpe"), "steps": spec["steps"],
              "final_losses": {k[5:]: v for k, v in losses.items() if k.startswith("loss_")},
              "train_persons_per_s": val.get("train_persons_per_s"), "curve": session.curve(),
              "train_seconds": round(train_seconds, 1), "seconds": round(time.perf_counter() - t0, 1),
              "cpu_seconds": round(_cpu_seconds() - cpu0, 1)}
    shutil.rmtree(Path(spec["run_dir"]) / "checkpoints", ignore_errors=True)  # MBs per run, not needed
    (Path(spec["run_dir"]) / "result.json").write_text(json.dumps(record, indent=2))
    return record


class CurveSession(BareSession):
    """A `BareSession` that keeps every validation of the run (its learning curve) in
    `run_dir/curve.jsonl`, across interruptions, and only the latest checkpoint."""

    def report(self, metrics: dict, checkpoint_dir: str | None = None):
        super().report(metrics, checkpoint_dir)
        if "val_pa_mpjpe" in metrics:
            point = {k: metrics[k] for k in ("step", *CURVE_KEYS) if _finite(metrics.get(k))}
            with open(self.run_dir / "curve.jsonl", "a") as fh:
                fh.write(json.dumps(point) + "\n")
        for old in (self.run_dir / "checkpoints").glob("step_*"):
            if checkpoint_dir and old.name != Path(checkpoint_dir).name:
                shutil.rmtree(old, ignore_errors=True)

    def curve(self) -> list[dict]:
        """The run's validations, one per step, in step order."""
        path = self.run_dir / "curve.jsonl"
        points = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        return sorted({p["step"]: p for p in points}.values(), key=lambda p: p["step"])


#: What a learning-curve point holds besides its step (the val split's means).
CURVE_KEYS = ("val_pa_mpjpe", "val_mpjpe", "val_pve", "val_cam_err", "val_scale_ratio", "train_persons_per_s")


@torch.no_grad()
def evaluate_split(cfg, model, shards: str, device=torch.device("cpu"), const_cam=None) -> dict:
    """Mean errors (mm) on `shards`: the validation protocol plus the camera quantities,
    the constant camera `const_cam`'s error beside the camera error, and every person's
    errors (`per_person`, in key order) for paired differences between runs."""
    from ..body import load_body_model
    from ..data.pipeline import Loader
    from ..eval.protocol import camera_depth_error, constant_camera_error, evaluate_batch, roi_camera_spread
    cfg = replace(cfg, data=replace(cfg.data, val_shards=shards, max_val_samples=0, loader_workers=0))
    body = load_body_model(cfg.model.smpl_dir, genders=("neutral", "male", "female")).to(device)
    keys, rows = [], {key: [] for key in (*METRICS, *CAMERA_BASELINES)}
    with Loader(cfg, "val") as loader:
        for batch in loader.epoch(0):
            pred, errors = evaluate_batch(model, body, batch, device)
            errors["cam_depth_err"] = camera_depth_error(pred["cam_full"][:, 0], batch["cam_full"].to(device))
            errors["roi_cam_spread"] = roi_camera_spread(pred["cam_full"])
            errors["const_cam_err"] = (constant_camera_error(const_cam, batch["cam_full"], batch["boxes"][:, 0],
                                                             batch["image_size"], batch["focal"])
                                       if const_cam else torch.full((len(batch["keys"]),), math.nan))
            for key in rows:
                rows[key] += errors[key].double().cpu().tolist()
            keys += batch["keys"]
    order = sorted(range(len(keys)), key=keys.__getitem__)
    means = {key: sum(values) / max(len(values), 1) for key, values in rows.items()}
    per_person = {key: [round(rows[key][i], 3) for i in order] for key in ("mpjpe", "pa_mpjpe", "pve", "cam_err")}
    return means | {"test_samples": len(keys), "per_person": per_person}


def test_baseline(config: str, overrides, shards: dict) -> dict:
    """The baselines on the test split: the mean pose (the train split's mean pose and
    shape, with every person's errors in key order) and the constant camera (the train
    split's median crop camera, `const_cam`, and its error)."""
    from ..eval.protocol import split_constant_camera_error, split_crop_camera
    from ..synthetic.body_model import with_default_body_model
    from .demo import mean_pose_baseline
    cfg = with_default_body_model(load_config(config, [
        *overrides, f"data.train_shards={shards['train']}", f"data.val_shards={shards['test']}"]))
    baseline = mean_pose_baseline(cfg, per_person=True)
    const_cam = split_crop_camera(shards["train"])
    return baseline | {"const_cam": const_cam, "const_cam_err": split_constant_camera_error(const_cam, shards["test"])}


# ----------------------------------------------------------------------------- results

def load_results(path: Path) -> dict:
    """results.json, or an empty record; a file that is not a study's results is refused."""
    if not path.exists():
        return {"runs": []}
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise SystemExit(f"raytrain study: {path} is not valid JSON ({err}); move it away to start afresh") from None
    if not isinstance(results, dict) or not isinstance(results.get("runs"), list):
        raise SystemExit(f"raytrain study: {path} holds no 'runs' list; move it away to start afresh") from None
    results["runs"] = [r for r in results["runs"] if isinstance(r, dict) and {"variant", "seed", "settings"} <= set(r)]
    return results


def write_results(path: Path, results: dict):
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(path)


def aggregate(results: dict) -> dict[str, dict]:
    """{variant: {n, seeds, metric: (mean, std)}}; std over seeds (n - 1), 0 for one seed."""
    by_variant: dict[str, list[dict]] = {}
    for run in results["runs"]:
        by_variant.setdefault(run["variant"], []).append(run)
    out = {}
    for variant, runs in by_variant.items():
        row = {"n": len(runs), "seeds": sorted(r["seed"] for r in runs)}
        for key in COLUMNS:
            values = [r[key] for r in runs if _finite(r.get(key))]
            mean, std = mean_std(values)
            row[key] = (mean, std if len(values) > 1 else math.nan)   # one seed: no spread measured
        out[variant] = row
    return out


def mean_std(values: list[float]) -> tuple[float, float]:
    """(mean, sample standard deviation) of values; std 0 for one value, NaNs for none."""
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def compare(before: tuple[float, float], after: tuple[float, float]) -> tuple[float, float, str]:
    """(difference after - before, spread = the larger seed std, verdict) for a lower-is-better
    metric; a NaN std (a variant with one seed) leaves the spread unmeasured."""
    diff = after[0] - before[0]
    if not _finite(diff):
        return math.nan, math.nan, "not measured"
    if not (_finite(before[1]) and _finite(after[1])):
        return diff, math.nan, "one seed: no seed spread to judge it against"
    spread = max(before[1], after[1])
    if abs(diff) <= spread:
        return diff, spread, "within the seed spread"
    return diff, spread, "better, beyond the spread" if diff < 0 else "worse, beyond the spread"


def paired_difference(runs: list[dict], before: str, after: str, key: str) -> tuple[float, float, int]:
    """(mean, std, count) over the seeds both variants ran of after - before: runs of one seed
    share the initialisation and the data order, so this removes most seed-to-seed spread."""
    values = {(r["variant"], r["seed"]): r.get(key) for r in runs}
    diffs = [values[(after, s)] - values[(before, s)] for (v, s) in values
             if v == before and _finite(values.get((after, s))) and _finite(values[(before, s)])]
    mean, std = mean_std(diffs)
    return mean, std, len(diffs)


def per_person_difference(before: list[list[float]], after: list[list[float]]) -> dict | None:
    """Per-person paired difference on the same test people: each person's error averaged
    over the seeds both variants ran (before[k], after[k]: seed k's errors in key order),
    then after - before over people: mean, standard error, t, fraction of people better."""
    pairs = [(b, a) for b, a in zip(before, after) if len(b) == len(a) and b]
    if not pairs or len({len(b) for b, _ in pairs}) != 1:
        return None
    people = len(pairs[0][0])
    diffs = [sum(a[i] - b[i] for b, a in pairs) / len(pairs) for i in range(people)]
    diffs = [d for d in diffs if math.isfinite(d)]
    if len(diffs) < 2:
        return None
    mean, std = mean_std(diffs)
    se = std / math.sqrt(len(diffs))
    return {"mean": mean, "se": se, "t": mean / se if se > 0 else math.nan,
            "better": sum(d < 0 for d in diffs) / len(diffs), "people": len(diffs), "seeds": len(pairs)}


def _per_person(runs: list[dict], variant: str, key: str) -> dict[int, list[float]]:
    """{seed: per-person errors} of a variant's runs (the baseline: 'mean_pose', seed None)."""
    return {r["seed"]: r["per_person"][key] for r in runs
            if r["variant"] == variant and key in (r.get("per_person") or {})}


def paired_line(runs: list[dict], before: str, after: str, key: str, baseline: dict | None = None) -> str:
    """'; per person: ...' for `key` of after - before (before may be the mean-pose baseline)."""
    late = _per_person(runs, after, key)
    if baseline is not None:
        early = (baseline.get("per_person") or {}).get(key)
        seeds = sorted(late)
        found = per_person_difference([early] * len(seeds), [late[s] for s in seeds]) if early else None
    else:
        early = _per_person(runs, before, key)
        seeds = sorted(set(early) & set(late))
        found = per_person_difference([early[s] for s in seeds], [late[s] for s in seeds])
    if not found:
        return ""
    return (f"; per person: {found['mean']:+.1f} ± {found['se']:.1f} mm (t {found['t']:+.1f}, "
            f"{100 * found['better']:.0f} % of {found['people']} people better, {found['seeds']} seed(s))")


def baseline_lines(stats: dict, results: dict) -> list[str]:
    """Every variant against the baselines: PA-MPJPE and MPJPE against the mean pose, the
    camera error against the constant camera."""
    baseline, runs = results.get("baseline") or {}, results["runs"]
    if not baseline:
        return []
    lines = []
    for variant, row in stats.items():
        parts = []
        for key in ("pa_mpjpe", "mpjpe"):
            if _finite(row[key][0]) and _finite(baseline.get(key)):
                parts.append(f"{LABELS[key]} {row[key][0] - baseline[key]:+.1f} mm against the mean pose"
                             + paired_line(runs, "", variant, key, baseline=baseline))
        if _finite(row["cam_err"][0]) and _finite(baseline.get("const_cam_err")):
            parts.append(f"camera error {row['cam_err'][0] - baseline['const_cam_err']:+.1f} mm against the "
                         f"constant camera (scale ratio {row['scale_ratio'][0]:.3f})")
        lines.append(f"- `{variant}`: " + "; ".join(parts))
    return lines


def claim_lines(stats: dict, runs: list[dict] = ()) -> list[str]:
    """One line per (claim, metric): the difference, the spread and the verdict, the
    same-seed difference of the means and the per-person paired difference."""
    lines = []
    comparisons = list(CLAIMS)
    comparisons += [(f"L_cont remedy `{v}` on top of L_cam", "m5_cam", v, METRICS)
                    for v in stats if v.startswith("cont_")]
    comparisons += [(f"fusion `{v[7:]}` instead of RAF", "m5_cam", v, ("mpjpe", "pa_mpjpe", "pve", "cam_err"))
                    for v in stats if v.startswith("fusion_")]
    for claim, without, with_, metrics in comparisons:
        if without not in stats or with_ not in stats:
            lines.append(f"- **{claim}** (`{without}` -> `{with_}`): not measured (runs missing)")
            continue
        n = f"{stats[without]['n']} / {stats[with_]['n']} seeds"
        lines.append(f"- **{claim}** (`{without}` -> `{with_}`, {n}):")
        for key in metrics:
            diff, spread, verdict = compare(stats[without][key], stats[with_][key])
            paired, paired_std, count = paired_difference(list(runs), without, with_, key)
            same_seed = f"; same seed: {paired:+.1f} ± {paired_std:.1f} mm ({count})" if count > 1 else ""
            person = paired_line(list(runs), without, with_, key)
            against = f" (spread {spread:.1f} mm)" if _finite(spread) else ""
            lines.append(f"    - {LABELS[key]}: {diff:+.1f} mm{against}: {verdict}{same_seed}{person}")
    return lines


def report_table(results: dict) -> str:
    """Markdown: the table of every variant (mean ± std over seeds) and the claim lines."""
    stats = aggregate(results)
    header = ["variant", "seeds", *[LABELS[k] for k in COLUMNS]]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---", "---:"] + ["---:"] * len(COLUMNS)) + "|"]
    baseline = results.get("baseline") or {}
    if baseline:
        cells = [_cell(baseline.get(k), None, k) for k in COLUMNS]
        lines.append("| baselines: mean pose of the train split (true orientation), constant camera | – | "
                     + " | ".join(cells) + " |")
    for variant, row in stats.items():
        cells = [_cell(*row[k], k) for k in COLUMNS]
        lines.append(f"| `{variant}` | {row['n']} | " + " | ".join(cells) + " |")
    settings = results.get("settings", {})
    lines += ["", f"Test split, errors in mm, mean ± standard deviation over seeds (the mean alone for one "
              f"seed); {settings.get('steps')} "
              f"steps of {settings.get('batch_size')} persons per run at {settings.get('crop_size')} px; splits "
              f"{settings.get('sizes')}; headings ± {settings.get('heading_deg')}°, joints within "
              f"{settings.get('pose_scale')} of their limits. The constant camera predicts the train split's "
              "median crop camera for everyone; the scale ratio is the predicted over the true crop-camera "
              "scale (below 1: people placed too far away).", "", "Against the baselines (per person: mean ± "
              "standard error over the test people of the paired difference, t, share of people better):", "",
              *baseline_lines(stats, results), "", "Claims (lower is better; spread = the larger of the two "
              "variants' seed standard deviations; same seed = mean ± std over seeds of the difference between "
              "runs of equal seed, which share initialisation and data order; per person = the paired "
              "difference on the same test people):", "", *claim_lines(stats, results["runs"])]
    curves = curve_table(results)
    if curves:
        lines += ["", "Learning curves (the val split, PA-MPJPE / camera error in mm, at steps of the run; "
                  "all points in results.json and curves.png):", "", *curves]
    return "\n".join(lines) + "\n"


def curve_table(results: dict, points: int = 5) -> list[str]:
    """Markdown rows: every run's val PA-MPJPE / camera error at `points` evenly spaced
    steps of the learning curves (the last step included)."""
    runs = [r for r in results["runs"] if r.get("curve")]
    steps = sorted({p["step"] for r in runs for p in r["curve"]})
    if not steps:
        return []
    shown = sorted({steps[round(k * (len(steps) - 1) / max(points - 1, 1))] for k in range(points)})
    lines = ["| step | " + " | ".join(f"`{r['variant']}` s{r['seed']}" for r in runs) + " |",
             "|---:|" + "---:|" * len(runs)]
    for step in shown:
        cells = []
        for run in runs:
            point = next((p for p in run["curve"] if p["step"] == step), {})
            pa, cam = point.get("val_pa_mpjpe"), point.get("val_cam_err")
            cells.append(f"{pa:.1f} / {cam:.0f}" if _finite(pa) and _finite(cam) else "–")
        lines.append(f"| {step:,} | " + " | ".join(cells) + " |")
    return lines


MARKERS = ("<!-- study-results:start -->", "<!-- study-results:end -->")


def write_report(results: dict, out_dir: Path) -> None:
    """`<out>/table.md` and `<out>/study.png` from the results; the table also replaces the
    block between MARKERS of `<out>.md` when that page exists (docs/study.md for docs/study)."""
    if not results["runs"]:
        return
    table = report_table(results)
    (out_dir / "table.md").write_text(table)
    plot(results, out_dir / "study.png")
    plot_curves(results, out_dir / "curves.png")
    _say(f"wrote {out_dir / 'results.json'}, {out_dir / 'table.md'}, {out_dir / 'study.png'}, {out_dir / 'curves.png'}")
    page = out_dir.with_suffix(".md")
    if page.exists():
        text = page.read_text()
        start, end = text.find(MARKERS[0]), text.find(MARKERS[1])
        if 0 <= start < end:
            page.write_text(text[:start + len(MARKERS[0])] + "\n" + table + text[end:])
            _say(f"updated the results in {page}")


def plot(results: dict, path: Path, metrics=("pa_mpjpe", "mpjpe", "cam_err", "roi_cam_spread")) -> None:
    """Bars (mean) with error bars (std) and the single seeds as dots, one panel per metric."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    stats = aggregate(results)
    names = list(stats)
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 0.45 * len(names) + 1.6))
    for ax, key in zip(axes, metrics):
        means = [stats[v][key][0] for v in names]
        stds = [stats[v][key][1] if _finite(stats[v][key][1]) else 0.0 for v in names]
        ax.barh(range(len(names)), means, xerr=stds, color="#8fb3d9", capsize=3)
        for i, v in enumerate(names):
            seeds = [r[key] for r in results["runs"] if r["variant"] == v and _finite(r.get(key))]
            ax.plot(seeds, [i] * len(seeds), "k.", markersize=4)
        ax.set_yticks(range(len(names)), names if key == metrics[0] else [""] * len(names))
        ax.invert_yaxis()
        finite = [m for m in means if _finite(m) and m > 0]
        if finite and max(finite) > 20 * sorted(finite)[len(finite) // 2]:
            ax.set_xscale("log")  # a diverged variant would flatten every other bar
        ax.set_title(f"{LABELS[key]} (mm)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(results: dict, path: Path) -> None:
    """Learning curves: val-split PA-MPJPE and camera error against persons seen, one line per
    run, with the mean-pose and constant-camera levels of the test split dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    batch = results.get("settings", {}).get("batch_size") or 1
    baseline = results.get("baseline") or {}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, level, label in ((axes[0], "val_pa_mpjpe", "pa_mpjpe", "mean pose"),
                                  (axes[1], "val_cam_err", "const_cam_err", "constant camera")):
        for run in results["runs"]:
            points = [p for p in run.get("curve") or [] if _finite(p.get(key))]
            if points:
                ax.plot([p["step"] * batch for p in points], [p[key] for p in points], marker=".",
                        label=f"{run['variant']} s{run['seed']}")
        if _finite(baseline.get(level)):
            ax.axhline(baseline[level], color="k", linestyle="--", linewidth=1, label=f"{label} (test)")
        ax.set_xlabel("persons seen")
        ax.set_title(f"{key} (mm)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- helpers

def _cell(mean, std, key: str) -> str:
    """A table cell: mean ± std (std None or NaN: the mean alone), 3 decimals for the scale ratio."""
    if not _finite(mean):
        return "–"
    digits = 3 if key == "scale_ratio" else 1
    return f"{mean:.{digits}f}" + ("" if std is None or not _finite(std) else f" ± {std:.{digits}f}")


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def _say(text: str):
    print(f"[study] {text}", flush=True)


if __name__ == "__main__":  # one run, in its own process: python -m raytrain.apps.study --run spec.json
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", required=True)
    run_one(parser.parse_args().run)
