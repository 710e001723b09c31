"""The hard synthetic benchmark, the study's metrics and the `raytrain study` runner (quick flavour)."""
import json
import math

import numpy as np
import pytest
import torch

from raytrain.apps.study import QUICK, compare, mean_std, paired_difference, run_study
from raytrain.config import DataConfig
from raytrain.data.crop import MultiRoICropper
from raytrain.data.schema import decode_sample
from raytrain.eval.protocol import camera_depth_error, roi_camera_spread
from raytrain.losses import contrastive_warmup
from raytrain.synthetic.hard import hard_synthetic_config
from raytrain.synthetic.people import SyntheticGenerator, pooled_background, sample_scene, with_storage


def test_roi_camera_spread_and_depth_error_by_hand():
    cams = torch.tensor([[[0.0, 0.0, 5.0], [0.2, 0.0, 5.0]],       # 0.1 m from the mean each
                         [[1.0, 1.0, 3.0], [1.0, 1.0, 3.0]]])      # agree
    assert torch.allclose(roi_camera_spread(cams), torch.tensor([100.0, 0.0]))
    assert torch.allclose(roi_camera_spread(cams[:, :1]), torch.zeros(2))   # M = 1
    assert torch.allclose(camera_depth_error(cams[:, 0], cams[:, 1] + torch.tensor([9.0, 9.0, 0.25])),
                          torch.tensor([250.0, 250.0]))


def test_contrastive_warmup_ramps_linearly():
    assert contrastive_warmup(0, 0) == 1.0 and contrastive_warmup(50, 0) == 1.0
    assert [contrastive_warmup(s, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_per_person_difference_pairs_the_same_people():
    from raytrain.apps.study import per_person_difference
    before = [[10.0, 20.0, 30.0, 40.0], [12.0, 22.0, 32.0, 42.0]]        # two seeds, four people
    after = [[9.0, 18.0, 31.0, 37.0], [11.0, 20.0, 33.0, 39.0]]
    found = per_person_difference(before, after)                        # per person: -1, -2, +1, -3
    assert found["mean"] == pytest.approx(-1.25) and found["people"] == 4 and found["seeds"] == 2
    assert found["se"] == pytest.approx(math.sqrt(((0.25 ** 2) + 0.75 ** 2 + 2.25 ** 2 + 1.75 ** 2) / 3) / 2)
    assert found["better"] == 0.75 and found["t"] == pytest.approx(found["mean"] / found["se"])
    assert per_person_difference([[1.0, 2.0]], [[1.0]]) is None          # not the same people


def test_mean_std_and_compare():
    assert mean_std([1.0, 3.0]) == (2.0, math.sqrt(2.0))
    assert mean_std([4.0]) == (4.0, 0.0)
    assert compare((10.0, 1.0), (7.0, 2.0)) == (-3.0, 2.0, "better, beyond the spread")
    assert compare((10.0, 1.0), (11.0, 2.0)) == (1.0, 2.0, "within the seed spread")
    assert compare((10.0, 1.0), (13.0, 0.5))[2] == "worse, beyond the spread"
    assert compare((10.0, math.nan), (7.0, 0.5))[2] == "one seed: no seed spread to judge it against"
    runs = [{"variant": "a", "seed": 0, "m": 10.0}, {"variant": "a", "seed": 1, "m": 20.0},
            {"variant": "b", "seed": 0, "m": 9.0}, {"variant": "b", "seed": 1, "m": 17.0},
            {"variant": "a", "seed": 2, "m": 5.0}]                     # seed 2 of b is missing
    assert paired_difference(runs, "a", "b", "m") == (-2.0, math.sqrt(2.0), 2)


def test_hard_scenes_have_crowds_occluders_and_pooled_backgrounds():
    cfg = hard_synthetic_config(64)
    scenes = [sample_scene(np.random.default_rng([101, i]), cfg) for i in range(40)]
    assert {len(s.others) for s in scenes} == {0, 1, 2}
    assert {len(s.occluders) for s in scenes} == {0, 1, 2}
    pool = [pooled_background(k) for k in range(cfg.background_pool)]
    used = {next(k for k, p in enumerate(pool) if p is s.background) for s in scenes}
    assert 1 < len(used) <= cfg.background_pool      # shared textures, several of them
    # the demo's distribution is unchanged: with the knobs off no extra draw happens
    plain = with_storage(None, "context")
    a, b = sample_scene(np.random.default_rng([5, 0]), plain), sample_scene(np.random.default_rng([5, 0]), plain)
    assert a.others == [] and a.occluders == [] and np.array_equal(a.pose, b.pose)


def test_hard_samples_are_deterministic_and_labels_exact(body_model):
    generator = SyntheticGenerator(hard_synthetic_config(64), body_model)
    indices = range(10)
    first = generator.samples(101, indices)
    again = generator.samples(101, [5])[0]
    assert np.array_equal(first[5]["image"], again["image"])
    truncated = 0
    for raw in first:
        meta, keypoints = raw["meta"], raw["arrays"]["keypoints_2d"]
        w, h = meta["image_size"]
        cx, cy, b = meta["box"]
        truncated += cx - b / 2 < 0 or cy - b / 2 < 0 or cx + b / 2 > w or cy + b / 2 > h
        # labels are the labelled person's: its joints project onto its keypoints
        joints = raw["arrays"]["joints_3d"][:, :3].astype(np.float64)
        projected = joints[:, :2] / joints[:, 2:] * meta["focal"] + np.array([w, h]) / 2
        assert np.abs(projected - keypoints[:, :2]).max() < 0.01
    assert truncated >= 2   # people cut by the image border occur


def test_other_people_and_occluders_change_the_picture(body_model):
    cfg = hard_synthetic_config(64)
    crowded = SyntheticGenerator(cfg, body_model)
    index = next(i for i in range(40) if len(crowded.scenes(101, [i])[0].others) == 2
                 and crowded.scenes(101, [i])[0].occluders)
    alone = type(cfg)(**{**cfg.__dict__, "others": (0, 0), "occluders": (0, 0)})
    with_crowd = crowded.samples(101, [index])[0]
    without = SyntheticGenerator(alone, body_model).samples(101, [index])[0]
    assert with_crowd["meta"]["box"] == without["meta"]["box"]
    changed = (with_crowd["image"] != without["image"]).any(axis=2).mean()
    assert changed > 0.005, changed


def test_roi_colour_jitter_gives_each_roi_its_own_colour(body_model):
    encoded = SyntheticGenerator(hard_synthetic_config(64), body_model).encoded(101, range(2))
    samples = [decode_sample(e, decode_image=False) for e in encoded]
    plain = DataConfig(scale_jitter=0.0, rot_jitter_deg=0.0, flip_prob=0.0, color_jitter=0.0, occlusion_prob=0.0)
    jitter = DataConfig(**{**plain.__dict__, "roi_color_jitter": 0.3})
    for sample in samples:
        base = MultiRoICropper("paper", 5, 64, augment=plain)(sample, np.random.default_rng(0))["images"]
        out = MultiRoICropper("paper", 5, 64, augment=jitter)(sample, np.random.default_rng(0))["images"]
        ratio = out.reshape(5, -1, 3).sum(1) / np.maximum(base.reshape(5, -1, 3).sum(1), 1)  # (M, 3)
        assert np.ptp(ratio, axis=0).max() > 0.05          # RoIs differ in colour gain
        assert ((0.6 < ratio) & (ratio < 1.35)).all()       # within [1 - c, 1 + c] up to saturation


@pytest.mark.slow
def test_quick_study_writes_results_table_plot_and_resumes(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    (tmp_path / "out.md").write_text("# page\n<!-- study-results:start -->\nold\n<!-- study-results:end -->\ntail\n")
    results = run_study(out=str(out), work=str(work), quick=True)
    stored = json.loads((out / "results.json").read_text())
    pairs = sorted((r["variant"], r["seed"]) for r in stored["runs"])
    assert pairs == sorted((v, s) for v in QUICK["variants"] for s in range(QUICK["seeds"]))
    assert [r["seed"] for r in stored["runs"]] == sorted(r["seed"] for r in stored["runs"])  # seed by seed
    for run in stored["runs"]:
        for key in ("mpjpe", "pa_mpjpe", "pve", "cam_err", "cam_depth_err", "roi_cam_spread", "const_cam_err"):
            assert math.isfinite(run[key]) and run[key] >= 0, (run["variant"], key)
        assert run["test_samples"] == QUICK["sizes"]["test"] and run["steps"] == QUICK["steps"]
        # the camera baselines beside the camera error: the train split's median crop camera
        # scored on the test split (the same for every run), and the scale ratio
        assert run["const_cam_err"] == pytest.approx(stored["baseline"]["const_cam_err"], rel=1e-4)
        assert 0.2 < run["scale_ratio"] < 5
        assert len(run["per_person"]["pa_mpjpe"]) == QUICK["sizes"]["test"]
        assert sum(run["per_person"]["pa_mpjpe"]) / QUICK["sizes"]["test"] == pytest.approx(run["pa_mpjpe"], abs=0.01)
        assert [p["step"] for p in run["curve"]] == list(range(1, QUICK["steps"] + 1))   # a learning curve
        assert run["cpu_seconds"] > 0
    assert stored["settings"]["sizes"]["train"] == QUICK["sizes"]["train"]
    assert len(stored["baseline"]["const_cam"]) == 3 and stored["baseline"]["const_cam_err"] > 0
    assert len(stored["baseline"]["per_person"]["pa_mpjpe"]) == QUICK["sizes"]["test"]
    assert next(r for r in stored["runs"] if r["variant"] == "cliff")["roi_cam_spread"] == 0.0
    assert next(r for r in stored["runs"] if r["variant"] == "m5_cam")["roi_cam_spread"] > 0.0
    assert stored["baseline"]["pa_mpjpe"] > 0
    table = (out / "table.md").read_text()
    assert "`full` | 2 |" in table and "L_cont helps on top of L_cam" in table
    assert "| constant camera | scale ratio |" in table and "per person:" in table
    assert "against the constant camera (scale ratio" in table
    assert "Learning curves" in table and "| step | `cliff` s0 |" in table          # the curves, as numbers
    rows = [line.split(" | ")[0] for line in table.splitlines() if line.startswith(("| 1 |", "| 2 |"))]
    assert rows == ["| 1", "| 2"]                                                   # every run's points
    assert (out / "study.png").stat().st_size > 10_000 and (out / "curves.png").stat().st_size > 10_000
    page = (tmp_path / "out.md").read_text()
    assert "old" not in page and table in page and page.startswith("# page") and page.endswith("tail\n")
    # a rerun trains nothing it holds; a run dropped from results.json is trained again
    again = run_study(out=str(out), work=str(work), quick=True)
    assert [r["seconds"] for r in again["runs"]] == [r["seconds"] for r in results["runs"]]
    stored["runs"] = [r for r in stored["runs"] if (r["variant"], r["seed"]) != ("full", 1)]
    (out / "results.json").write_text(json.dumps(stored))
    third = run_study(out=str(out), work=str(work), quick=True)
    assert len(third["runs"]) == len(results["runs"])
    assert third["runs"][-1]["variant"] == "full" and third["runs"][-1]["seed"] == 1


@pytest.mark.parametrize("args, named", [(["--device", "cuda"], "--device cuda"),
                                         (["--device", "tpu:x"], "--device tpu:x"),
                                         (["--heading", "0"], "--heading"),
                                         (["--pose-scale", "1.5"], "--pose-scale")])
def test_study_refuses_what_it_cannot_use_before_rendering(tmp_path, capsys, args, named):
    """A device torch cannot use here, or a benchmark narrowed out of range, stops the
    study with exit 2 and one line, before any split is rendered."""
    from raytrain.cli import main
    if args == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    code = main(["study", "--quick", *args, "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and named in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "work").exists()


def test_narrowed_benchmark_renders_its_own_splits(tmp_path):
    """--heading / --pose-scale render a benchmark of their own (the default splits stay as
    they are): the headings of its people stay within the range."""
    from scipy.spatial.transform import Rotation

    from raytrain.data.reader import ShardReader
    from raytrain.synthetic.hard import ensure_hard_splits
    shards = ensure_hard_splits(tmp_path / "narrow", {"test": 12}, heading_deg=30, pose_scale=0.3)
    recorded = json.loads((tmp_path / "narrow" / "test" / "synthetic.json").read_text())["synthetic"]
    assert recorded["heading_range"] == pytest.approx(math.radians(30)) and recorded["pose_scale"] == 0.3
    for sample in ShardReader(shards["test"], shuffle=False, decode_images=False):
        facing = Rotation.from_rotvec(sample.pose[:3]).apply([0.0, 0.0, 1.0])  # body front in camera
        heading = math.degrees(math.atan2(facing[0], -facing[2]))
        assert abs(heading) < 30 + 25, heading  # + the pitch/roll around upright


def test_study_runs_the_training_preflight_before_training(tmp_path, capsys):
    """`raytrain study` trains through the bare loop, after the pre-flight every training
    command runs: a backbone file matching too little exits 2 naming the key, no run trained."""
    import timm

    from raytrain.cli import main
    state = timm.create_model("mobilenetv3_small_050", pretrained=False).state_dict()
    keys = list(state)
    torch.save({k: state[k] for k in keys[:len(keys) // 3]}, tmp_path / "third.pth")
    code = main(["study", "--quick", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"),
                 f"model.backbone_checkpoint={tmp_path / 'third.pth'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("raytrain: config error: model.backbone_checkpoint:"), err
    assert "matches only" in err[-1]
    assert not (tmp_path / "work" / "runs").exists() or not any((tmp_path / "work" / "runs").iterdir())
