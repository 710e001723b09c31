"""`raytrain predict` against hostile inputs and outputs, and the interface of its flags.

The admission rule (regular files, the EXIF convention, the box and number rules, source
names), the output rule (checked before the model loads, refused when not empty, cleared
with --overwrite, locked, renamed into place, links never followed) and memory that does
not grow with the boxes of a picture. No mocks: the checkpoint of the real training loop,
real FIFOs, real JPEGs with EXIF blocks, a moto S3 server, a real local Ray instance."""
import io
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import test_predict
from conftest import body_dir
from PIL import Image
from test_predict import write_video

from raytrain.cli import build_parser
from raytrain.cli import main as cli_main
from raytrain.config import ConfigError
from raytrain.data.admission import decode_rgb, image_size
from raytrain.outputs import claim_output, clean_relative
from raytrain.predict.crop import BOX_SCALE
from raytrain.predict.inputs import SKIP_REASONS
from raytrain.predict.options import PredictOptions
from raytrain.predict.run import run_predict

world = test_predict.world   # the module's own instance of the fixture: a trained checkpoint, images, detections


def strict_lines(path) -> list[dict]:
    """Every line of a JSONL file through a parser that refuses NaN and Infinity."""
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")
    return [json.loads(line, parse_constant=refuse) for line in Path(path).read_text().splitlines()]


def predict(world, inputs, detections, out, *extra) -> int:
    return cli_main(["predict", *map(str, inputs), "--checkpoint", world["checkpoint"], "--detections",
                     str(detections), "--out", str(out), "--smpl-dir", body_dir(), "--device", "cpu", *extra])


def first_detection(world) -> dict:
    return json.loads(world["detections"].read_text())[0]


def options(world, **kwargs) -> PredictOptions:
    return PredictOptions(checkpoint=world["checkpoint"], smpl_dir=body_dir(), device="cpu", quiet=True, **kwargs)


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- admission: files


def test_a_fifo_in_a_folder_is_skipped_and_counted_in_seconds(world, tmp_path, capsys):
    folder = tmp_path / "inputs"
    folder.mkdir()
    first = first_detection(world)
    (folder / first["image_id"]).write_bytes((world["images"] / first["image_id"]).read_bytes())
    os.mkfifo(folder / "pipe.jpg")
    os.mkfifo(folder / "pipe.mp4")
    started = time.perf_counter()
    assert predict(world, [folder], world["detections"], tmp_path / "out") == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["persons"] == 1 and summary["skipped"]["not_regular_file"] == 2
    assert time.perf_counter() - started < 60          # a FIFO that is opened never returns
    # named directly: refused as what it is, in one line, before the model loads
    rc = predict(world, [folder / "pipe.jpg"], world["detections"], tmp_path / "out2")
    err = capsys.readouterr().err
    assert rc == 2 and "not a regular file" in err and "no such file" not in err and "Traceback" not in err


# ----------------------------------------------------------------------------- admission: EXIF


def with_orientation(rgb: np.ndarray, orientation: int) -> bytes:
    """A JPEG of ``rgb`` stored turned, with the EXIF tag that turns it back on display."""
    stored = {6: np.rot90(rgb, 1), 8: np.rot90(rgb, -1), 3: rgb[::-1, ::-1]}[orientation]
    image = Image.fromarray(np.ascontiguousarray(stored))
    exif = image.getexif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95, exif=exif)
    return buffer.getvalue()


def test_exif_orientation_is_one_convention(world, tmp_path):
    """A portrait photo stored sideways with its EXIF turn: the size after the turn, the
    same record with and without --render (before: raw pixels, or 'decoding failed')."""
    first = first_detection(world)
    rgb = cv2.cvtColor(cv2.imread(str(world["images"] / first["image_id"])), cv2.COLOR_BGR2RGB)
    data = with_orientation(rgb, 6)
    assert image_size(data) == (rgb.shape[1], rgb.shape[0])
    assert np.abs(decode_rgb(data).astype(int) - rgb).mean() < 3          # displayed as the original
    assert decode_rgb(data, exif=False).shape == (rgb.shape[1], rgb.shape[0], 3)   # a shard's stored pixels
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / first["image_id"]).write_bytes(data)
    (tmp_path / "dets.json").write_text(json.dumps([first]))
    plain = run_predict(options(world, inputs=[str(folder)], detections=str(tmp_path / "dets.json"),
                                out=str(tmp_path / "plain")))
    drawn = run_predict(options(world, inputs=[str(folder)], detections=str(tmp_path / "dets.json"),
                                out=str(tmp_path / "drawn"), render=True))
    assert plain["persons"] == drawn["persons"] == 1 and not any(plain["skipped"].values())
    assert strict_lines(plain["predictions"]) == strict_lines(drawn["predictions"])
    rendered = cv2.imread(str(tmp_path / "drawn" / "render" / first["image_id"]))
    assert rendered.shape == rgb.shape
    # and the record is the upright photo's (up to the JPEG re-encoding)
    upright = run_predict(options(world, inputs=[str(world["images"] / first["image_id"])],
                                  detections=str(tmp_path / "dets.json"), out=str(tmp_path / "upright")))
    mine, theirs = strict_lines(plain["predictions"])[0], strict_lines(upright["predictions"])[0]
    assert mine["focal"] == theirs["focal"] and mine["box"] == theirs["box"]
    np.testing.assert_allclose(mine["joints_2d"], theirs["joints_2d"], atol=8.0)


# ----------------------------------------------------------------------------- admission: boxes and numbers


def test_absurd_boxes_and_scores_are_counted_and_every_line_is_strict_json(world, tmp_path, capsys):
    first = first_detection(world)
    name = first["image_id"]
    text = json.dumps([
        first,                                                                   # good
        dict(first, bbox=[-1e30, -1e30, 1e30, 1e30]),                            # box_too_large
        dict(first, bbox=[100, 80, 60, 1e9]),                                    # box_too_large
        dict(first, bbox=[10, 10, 0.5, 0.5]),                                    # degenerate_box (< 1 px)
        dict(first, bbox=[True, 10, 20, 20]),                                    # bad_detection (boolean)
        dict(first, bbox=["10", "10", "20", "20"]),                              # bad_detection (strings)
        dict(first, score="0.9"),                                                # bad_detection (string)
        dict(first, score=True),                                                 # bad_detection (boolean)
        dict(first, frame=True),                                                 # bad_detection (boolean)
        {"image_id": name, "bbox": first["bbox"], "score": "NAN_SCORE"},         # bad_score (NaN)
        {"image_id": name, "bbox": first["bbox"], "score": "INF_SCORE"},         # bad_score (1e999)
        dict(first, score=0.3),                                                  # low_score
    ]).replace('"NAN_SCORE"', "NaN").replace('"INF_SCORE"', "1e999")
    (tmp_path / "dets.json").write_text(text)
    for render in ((), ("--render",)):
        out = tmp_path / f"out{len(render)}"
        assert predict(world, [world["images"] / name], tmp_path / "dets.json", out, *render) == 0
        summary = json.loads((out / "summary.json").read_text())
        expected = {"box_too_large": 2, "degenerate_box": 1, "bad_detection": 5, "bad_score": 2, "low_score": 1}
        assert summary["skipped"] == {reason: expected.get(reason, 0) for reason in SKIP_REASONS}
        records = strict_lines(out / "predictions.jsonl")
        assert len(records) == summary["persons"] == 1
        assert all(math.isfinite(v) for v in records[0]["cam_full"] + [records[0]["score"]])
        assert "Traceback" not in capsys.readouterr().err
    assert (tmp_path / "out1" / "render" / name).is_file()


def test_score_threshold_applies_to_the_detections_file(world, tmp_path):
    first = first_detection(world)
    (tmp_path / "dets.json").write_text(json.dumps([dict(first, score=0.3), dict(first, score=0.7)]))
    common = dict(inputs=[str(world["images"] / first["image_id"])], detections=str(tmp_path / "dets.json"))
    default = run_predict(options(world, out=str(tmp_path / "a"), **common))
    assert default["persons"] == 1 and default["skipped"]["low_score"] == 1
    assert [r["score"] for r in strict_lines(default["predictions"])] == [0.7]
    low = run_predict(options(world, out=str(tmp_path / "b"), score_threshold=0.2, **common))
    assert low["persons"] == 2 and low["skipped"]["low_score"] == 0


def test_detections_by_file_name_and_by_image_id_give_the_same_predictions(world, tmp_path):
    folder = tmp_path / "inputs"
    (folder / "day1").mkdir(parents=True)
    dets = json.loads(world["detections"].read_text())[:3]
    for det in dets:
        (folder / "day1" / det["image_id"]).write_bytes((world["images"] / det["image_id"]).read_bytes())
    by_file = [{"file_name": f"day1/{d['image_id']}", **{k: v for k, v in d.items() if k != "image_id"}}
               for d in dets]
    by_stem = [dict(d, image_id=d["image_id"].rsplit(".", 1)[0]) for d in dets]
    results = {}
    for label, entries in (("file_name", by_file), ("image_id", dets), ("stem", by_stem)):
        (tmp_path / f"{label}.json").write_text(json.dumps(entries))
        summary = run_predict(options(world, inputs=[str(folder)], detections=str(tmp_path / f"{label}.json"),
                                      out=str(tmp_path / label)))
        assert summary["persons"] == 3 and not any(summary["skipped"].values()), label
        results[label] = strict_lines(summary["predictions"])
    assert results["file_name"] == results["image_id"] == results["stem"]
    assert {r["image"] for r in results["file_name"]} == {f"day1/{d['image_id']}" for d in dets}
    # a file_name that climbs out of the input is refused, not matched
    (tmp_path / "climb.json").write_text(json.dumps([dict(by_file[0], file_name="../day1/x.jpg")]))
    summary = run_predict(options(world, inputs=[str(folder)], detections=str(tmp_path / "climb.json"),
                                  out=str(tmp_path / "climb")))
    assert summary["skipped"]["bad_detection"] == 1 and summary["persons"] == 0


def test_two_inputs_with_one_file_name_get_their_own_records_and_renders(world, tmp_path):
    first = first_detection(world)
    data = (world["images"] / first["image_id"]).read_bytes()
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / first["image_id"]).write_bytes(data)
    dets = [{"file_name": f"{folder}/{first['image_id']}", "bbox": first["bbox"], "score": 0.9}
            for folder in ("a", "b")]
    dets[1]["bbox"] = [v + 3 for v in first["bbox"][:2]] + first["bbox"][2:]
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    summary = run_predict(options(world, inputs=[str(tmp_path / "a"), str(tmp_path / "b")],
                                  detections=str(tmp_path / "dets.json"), out=str(tmp_path / "out"), render=True))
    records = strict_lines(summary["predictions"])
    assert len(records) == 2 and len({r["image"] for r in records}) == 2
    assert [r["bbox"] for r in records] == [d["bbox"] for d in dets]      # each its own detection
    assert len(list((tmp_path / "out" / "render").rglob("*.jpg"))) == 2


# ----------------------------------------------------------------------------- videos


def test_every_kth_frame_and_detections_of_missing_frames_and_videos(world, tmp_path):
    first = first_detection(world)
    rgb = cv2.cvtColor(cv2.imread(str(world["images"] / first["image_id"])), cv2.COLOR_BGR2RGB)
    write_video(tmp_path / "clip.mp4", [np.roll(rgb, k, axis=1) for k in range(5)])
    (tmp_path / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 200)
    dets = [{"image_id": "clip.mp4", "frame": k, "bbox": first["bbox"], "score": 0.9} for k in range(5)]
    dets += [{"image_id": "clip.mp4", "frame": 9, "bbox": first["bbox"], "score": 0.9},      # missing_frame
             {"image_id": "broken.mp4", "frame": 0, "bbox": first["bbox"], "score": 0.9}]    # unread_detection
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    summary = run_predict(options(world, inputs=[str(tmp_path / "clip.mp4"), str(tmp_path / "broken.mp4")],
                                  detections=str(tmp_path / "dets.json"), out=str(tmp_path / "out"), every=2,
                                  render=True))
    assert [r["frame"] for r in strict_lines(summary["predictions"])] == [0, 2, 4]
    assert summary["frames"] == 3 and summary["videos"] == 1
    assert summary["skipped"]["missing_frame"] == 1 and summary["skipped"]["unread_detection"] == 1
    assert summary["skipped"]["unreadable_video"] == 1
    video = cv2.VideoCapture(str(tmp_path / "out" / "render" / "clip.mp4"))
    assert int(video.get(cv2.CAP_PROP_FRAME_COUNT)) == 3
    video.release()


# ----------------------------------------------------------------------------- the output rule


def test_out_is_checked_before_the_model_loads(world, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    cases = {tmp_path / "file": "is a file", tmp_path / "file" / "inside": "which is a file"}
    if os.getuid() != 0:
        (tmp_path / "locked").mkdir(mode=0o500)
        cases[tmp_path / "locked" / "out"] = "not writable"
    else:
        cases[Path("/proc/raytrain-out")] = "not writable"
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    cases[link] = "is a link"
    for out, words in cases.items():
        # a checkpoint that does not exist: the --out error comes first
        rc = cli_main(["predict", str(world["images"]), "--checkpoint", str(tmp_path / "no-checkpoint"),
                       "--detections", str(world["detections"]), "--out", str(out), "--smpl-dir", body_dir()])
        err = capsys.readouterr().err
        assert rc == 2 and words in err and "--out" in err and "no-checkpoint" not in err, (out, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "elsewhere").exists()


def test_rerun_needs_overwrite_which_clears_the_previous_run(world, tmp_path, capsys):
    first = first_detection(world)
    out = tmp_path / "out"
    image = [world["images"] / first["image_id"]]
    assert predict(world, image, world["detections"], out, "--render", "--save-vertices") == 0
    before = tree(out)
    assert "render/" + first["image_id"] in before and "vertices/vertices-000000.npz" in before
    rc = predict(world, image, world["detections"], out)
    err = capsys.readouterr().err
    assert rc == 2 and "--overwrite" in err and "Traceback" not in err
    assert tree(out) == before                                        # nothing changed
    assert predict(world, image, world["detections"], out, "--overwrite") == 0
    after = tree(out)
    assert not any(name.startswith(("render/", "vertices/")) for name in after)   # no stale files
    assert len(strict_lines(out / "predictions.jsonl")) == 1
    # a folder holding only what predict writes (an older run's, without the marker) is cleared too
    stale = tmp_path / "stale"
    (stale / "vertices").mkdir(parents=True)
    (stale / "vertices" / "vertices-000007.npz").write_bytes(b"old")
    (stale / "predictions.jsonl").write_text("old\n")
    assert predict(world, image, world["detections"], stale, "--overwrite") == 0
    assert not (stale / "vertices").exists() and len(strict_lines(stale / "predictions.jsonl")) == 1
    # --overwrite clears only a folder a run wrote: a folder of photos is refused, untouched
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "holiday.jpg").write_bytes(b"precious")
    rc = predict(world, image, world["detections"], photos, "--overwrite")
    assert rc == 2 and "no run wrote" in capsys.readouterr().err
    assert (photos / "holiday.jpg").read_bytes() == b"precious"


def test_links_in_out_are_replaced_never_followed(world, tmp_path):
    first = first_detection(world)
    out = tmp_path / "out"
    image = [world["images"] / first["image_id"]]
    assert predict(world, image, world["detections"], out) == 0
    victim = tmp_path / "victim.txt"
    victim.write_text("unrelated")
    (out / "predictions.jsonl").unlink()
    (out / "predictions.jsonl").symlink_to(victim)
    (out / "summary.json").unlink()
    (out / "summary.json").symlink_to(victim)
    assert predict(world, image, world["detections"], out, "--overwrite") == 0
    assert victim.read_text() == "unrelated"
    assert not (out / "predictions.jsonl").is_symlink() and len(strict_lines(out / "predictions.jsonl")) == 1


def test_of_two_concurrent_writers_one_is_refused(world, tmp_path, capsys):
    """A run holds --out (the claim every writer makes); a second run is refused in one
    line and changes nothing; once the first lets go, the second may write (--overwrite)."""
    first = first_detection(world)
    image = [world["images"] / first["image_id"]]
    out = tmp_path / "out"
    holder = claim_output(out)
    holder.write_text("predictions.jsonl", "{}\n")
    try:
        rc = predict(world, image, world["detections"], out, "--overwrite")
        err = capsys.readouterr().err
        assert rc == 2 and "another run is writing" in err
        assert (out / "predictions.jsonl").read_text() == "{}\n"
    finally:
        holder.release()
    # two real runs at once: exactly one of them writes
    script = ("import sys; from raytrain.cli import main; sys.exit(main(sys.argv[1:]))")
    args = ["predict", str(world["images"]), "--checkpoint", world["checkpoint"], "--detections",
            str(world["detections"]), "--out", str(tmp_path / "both"), "--smpl-dir", body_dir(), "--device", "cpu",
            "--batch-size", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    runs = [subprocess.Popen([sys.executable, "-c", script, *args], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(run.wait(timeout=300), run.stderr.read()) for run in runs]
    for run in runs:
        run.stdout.close()
        run.stderr.close()
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    refused = next(err for code, err in results if code == 2)
    assert "another run is writing" in refused or "not empty" in refused
    assert len(strict_lines(tmp_path / "both" / "predictions.jsonl")) == len(json.loads(
        world["detections"].read_text()))


# ----------------------------------------------------------------------------- names from a bucket


def test_bucket_names_with_dotdot_write_nothing_outside_out(world, s3_endpoint, tmp_path):
    first = first_detection(world)
    data = (world["images"] / first["image_id"]).read_bytes()
    s3_endpoint.put_object(Bucket="runs", Key=f"pics/ok/{first['image_id']}", Body=data)
    s3_endpoint.put_object(Bucket="runs", Key="pics/../../../../x/evil.jpg", Body=data)
    s3_endpoint.put_object(Bucket="runs", Key="pics/a//b.jpg", Body=data)
    keys = [o["Key"] for o in s3_endpoint.list_objects_v2(Bucket="runs")["Contents"]]
    assert "pics/../../../../x/evil.jpg" in keys
    dets = [{"image_id": name, "bbox": first["bbox"], "score": 0.9}
            for name in (first["image_id"], "evil.jpg", "b.jpg")]
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    work = tmp_path / "deep" / "er" / "work"
    work.mkdir(parents=True)
    before = {p for p in tmp_path.rglob("*")}
    summary = run_predict(options(world, inputs=["s3://runs/pics"], detections=str(tmp_path / "dets.json"),
                                  out=str(work / "out"), render=True))
    assert summary["persons"] == 1 and summary["skipped"]["bad_name"] == 2
    new = {p for p in tmp_path.rglob("*")} - before
    assert new and all(work / "out" in p.parents or p == work / "out" for p in new), sorted(new)
    assert [p.name for p in (work / "out" / "render").rglob("*.jpg")] == [first["image_id"]]


# ----------------------------------------------------------------------------- memory and warnings


def _peak_rss_mb(args: list[str]) -> tuple[float, str]:
    script = ("import sys; from raytrain.cli import main; rc = main(sys.argv[1:]); "
              "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]; "
              "print('PEAK', int(hwm.split()[1]) // 1024); sys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-2000:]
    peak = [line for line in done.stdout.splitlines() if line.startswith("PEAK")][0]
    return float(peak.split()[1]), done.stdout


@pytest.mark.slow
def test_memory_does_not_grow_with_the_boxes_of_a_picture(world, tmp_path):
    """4000 boxes on one picture, with their vertices: within a few hundred MB of one box's
    peak (every person cropped, and every vertex array held, before the first write took GBs)."""
    first = first_detection(world)
    image = world["images"] / first["image_id"]
    peaks = {}
    for count in (1, 4000):
        (tmp_path / f"{count}.json").write_text(json.dumps([first] * count))
        peaks[count], stdout = _peak_rss_mb([
            "predict", str(image), "--checkpoint", world["checkpoint"], "--detections", str(tmp_path / f"{count}.json"),
            "--out", str(tmp_path / f"out{count}"), "--smpl-dir", body_dir(), "--device", "cpu", "--save-vertices",
            "--batch-size", "16"])
        assert len(strict_lines(tmp_path / f"out{count}" / "predictions.jsonl")) == count
    print("peak RSS MB by boxes:", peaks)
    assert peaks[4000] - peaks[1] < 300, peaks


def test_repeated_warnings_are_one_line_per_reason(world, tmp_path, caplog):
    first = first_detection(world)
    dets = [first] + [{"image_id": f"ghost{i}.jpg", "bbox": first["bbox"], "score": 0.9} for i in range(20000)]
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    summary = run_predict(options(world, inputs=[str(world["images"] / first["image_id"])],
                                  detections=str(tmp_path / "dets.json"), out=str(tmp_path / "out")))
    assert summary["skipped"]["missing_image"] == 20000
    lines = [r.getMessage() for r in caplog.records if "missing_image" in r.getMessage()]
    assert len(lines) == 1 and "20000" in lines[0] and "ghost0.jpg" in lines[0], lines


# ----------------------------------------------------------------------------- the interface


def test_flags_are_the_fields_of_predict_options():
    args = build_parser().parse_args(["predict", "a.jpg", "--checkpoint", "c", "--detections", "d.json"])
    opts = PredictOptions.from_args(args)
    assert opts.box_scale == BOX_SCALE and opts.every == 1 and not opts.overwrite
    for flag in ("--every", "--experiment", "--best", "--overwrite", "--score-threshold", "--render",
                 "--save-vertices", "--ray", "--batch-size"):
        assert flag in build_parser()._subparsers._group_actions[0].choices["predict"].format_help(), flag
    with pytest.raises(ConfigError, match="--every"):
        PredictOptions(inputs=["a"], checkpoint="c", detections="d", every=0).check()
    with pytest.raises(ConfigError, match="--checkpoint"):
        PredictOptions(inputs=["a"], checkpoint="c", experiment="e", detections="d").check()
    assert clean_relative("./a/b.jpg") == "a/b.jpg"
    for bad in ("/etc/x.jpg", "a/../b.jpg", "a//b.jpg", "", ".."):
        assert clean_relative(bad) is None, bad


def test_experiment_best_chooses_the_checkpoint_eval_would(world, tmp_path):
    from raytrain.eval.run import select_checkpoints
    experiment = str(Path(world["checkpoint"]).parent)
    chosen = select_checkpoints(experiment, best=True, top=1)[0]
    common = dict(inputs=[str(world["images"])], detections=str(world["detections"]))
    mine = run_predict(PredictOptions(experiment=experiment, best=True, smpl_dir=body_dir(), device="cpu",
                                      quiet=True, out=str(tmp_path / "best"), **common))
    theirs = run_predict(PredictOptions(checkpoint=str(chosen.path), smpl_dir=body_dir(), device="cpu", quiet=True,
                                        out=str(tmp_path / "ckpt"), **common))
    assert strict_lines(mine["predictions"]) == strict_lines(theirs["predictions"])


def test_eval_report_follows_the_output_rule(world, tmp_path):
    from raytrain.eval.run import run_eval
    out = tmp_path / "report"
    args = dict(checkpoint=world["checkpoint"], data=str(world["root"] / "val"), out=str(out), quiet=True,
                smpl_dir=body_dir(), overlays=1)
    run_eval(**args)
    before = tree(out)
    assert "metrics.json" in before and "report.md" in before
    with pytest.raises(ConfigError, match="--overwrite"):
        run_eval(**args)
    assert tree(out) == before
    run_eval(overwrite=True, **args)
    assert not [p for p in out.rglob(".*tmp-*")]


@pytest.mark.ray
def test_render_and_vertices_on_ray_equal_the_single_process(world, tmp_path):
    import ray

    from raytrain.predict.ray import run_predict_ray
    first = first_detection(world)
    rgb = cv2.cvtColor(cv2.imread(str(world["images"] / first["image_id"])), cv2.COLOR_BGR2RGB)
    write_video(tmp_path / "clip.mp4", [np.roll(rgb, 2 * k, axis=1) for k in range(4)])
    dets = json.loads(world["detections"].read_text()) + [
        {"image_id": "clip.mp4", "frame": k, "bbox": first["bbox"], "score": 0.9} for k in range(4)]
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    common = dict(inputs=[str(world["images"]), str(tmp_path / "clip.mp4")], detections=str(tmp_path / "dets.json"),
                  render=True, save_vertices=True, every=2, batch_size=4)
    single = run_predict(options(world, out=str(tmp_path / "single"), **common))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        on_ray = run_predict_ray(options(world, out=str(tmp_path / "ray"), ray=True, actors=1, actor_cpus=0.5,
                                         crop_cpus=0.5, **common))
    finally:
        ray.shutdown()
    assert on_ray["persons"] == single["persons"] and on_ray["skipped"] == single["skipped"]
    assert on_ray["frames"] == single["frames"] == 2

    def vertices_by_person(out):
        records = strict_lines(out / "predictions.jsonl")
        found = {}
        for path in sorted((out / "vertices").glob("*.npz")):
            with np.load(path) as stored:
                for line, vertices in zip(stored["record"], stored["vertices"]):
                    r = records[line]
                    found[(r["image"], r["frame"], r["person"])] = vertices
        return found

    mine, theirs = vertices_by_person(tmp_path / "single"), vertices_by_person(tmp_path / "ray")
    assert set(mine) == set(theirs) and len(mine) == single["persons"]
    for key, vertices in mine.items():
        np.testing.assert_allclose(theirs[key], vertices, atol=1e-4)
    rendered = sorted(p.relative_to(tmp_path / "single") for p in (tmp_path / "single" / "render").rglob("*.*"))
    assert rendered == sorted(p.relative_to(tmp_path / "ray") for p in (tmp_path / "ray" / "render").rglob("*.*"))
    for path in rendered:
        if path.suffix == ".jpg":
            a, b = cv2.imread(str(tmp_path / "single" / path)), cv2.imread(str(tmp_path / "ray" / path))
            assert np.abs(a.astype(int) - b.astype(int)).mean() < 2, path
