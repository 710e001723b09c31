"""`raytrain predict`: the same predictions as the evaluation path, the same records on Ray
Data, bad input skipped and counted, videos and renders, the detector path. No mocks: a
small network trained for two steps with the real loop, synthetic full frames stored as
image files, a real local Ray instance, real OpenCV videos."""
import json
import math

import cv2
import numpy as np
import pytest
import torch
from conftest import body_dir, moto_s3
from test_eval import small_overrides, write_synthetic

from raytrain.body import load_body_model
from raytrain.cli import main as cli_main
from raytrain.config import load_config
from raytrain.data.pipeline import Loader
from raytrain.data.shards import write_shards
from raytrain.eval.protocol import evaluate_batch, mesh_protocol
from raytrain.eval.run import eval_config
from raytrain.geometry import rotmat_to_axis_angle
from raytrain.predict.inputs import SKIP_REASONS
from raytrain.predict.model import load_inference_model
from raytrain.predict.ray import run_predict_ray
from raytrain.predict.run import PredictOptions, run_predict
from raytrain.synthetic.people import SyntheticConfig, SyntheticGenerator, encode_raw, with_storage
from raytrain.train.loop import run_loop
from raytrain.train.session import BareSession

N_PERSONS = 6
#: full frames, focal = the image diagonal (predict's default), small pictures
FRAMES = with_storage(SyntheticConfig(crop_size=64, focal_range=(1.0, 1.0),
                                      image_sizes=((320, 240), (240, 320))), "full")


def image_name(key: str) -> str:
    return f"person_{key.split('/')[2]}.jpg"


def coco_bbox(box, scale=1.2) -> list[float]:
    """The tight box a detector would give for a square training box (cx, cy, b)."""
    cx, cy, b = (float(v) for v in box)
    side = b / scale
    return [cx - side / 2, cy - side / 2, side, side]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Full-frame validation shards, the same frames as JPEG files with a COCO-results
    detections file, and a checkpoint of the real training loop (two steps)."""
    root = tmp_path_factory.mktemp("predict")
    write_synthetic(root / "train", 8, seed=1)
    samples = [encode_raw(raw) for raw in SyntheticGenerator(FRAMES).samples(2, range(N_PERSONS))]
    write_shards(samples, str(root / "val"), "synthetic", "test", maxcount=4)
    images = root / "images"
    images.mkdir()
    detections = []
    for sample in samples:
        name = image_name(sample["__key__"])
        (images / name).write_bytes(sample["jpg"])
        box = json.loads(sample["json"])["box"]
        detections.append({"image_id": name, "category_id": 1, "bbox": coco_bbox(box), "score": 0.9})
    (root / "detections.json").write_text(json.dumps(detections))
    cfg = load_config(None, small_overrides(root))
    session = BareSession(str(root / "experiment"), device="cpu")
    run_loop(cfg, session)
    return {"root": root, "cfg": cfg, "checkpoint": str(session.latest_checkpoint_dir()),
            "images": images, "detections": root / "detections.json",
            "keys": {image_name(s["__key__"]): s["__key__"] for s in samples}}


def read_records(path):
    return [json.loads(line) for line in open(path)]


def by_person(records):
    return {(r["image"], r["frame"], r["person"]): r for r in records}


@torch.no_grad()
def eval_path(world):
    """Per-person predictions and errors of the evaluation path (loader + evaluate_batch)."""
    model = load_inference_model(world["checkpoint"], body_dir(), device="cpu").model
    body = load_body_model(body_dir(), genders=("neutral", "male", "female"))
    cfg = eval_config(world["cfg"], str(world["root"] / "val"), smpl_dir=body_dir())
    found = {}
    with Loader(cfg, "val") as loader:
        for batch in loader.epoch(0):
            pred, errors = evaluate_batch(model, body, batch, torch.device("cpu"))
            pose = rotmat_to_axis_angle(pred["pose_rotmat"]).reshape(-1, 72)
            for i, key in enumerate(batch["keys"]):
                found[key] = {"pose": pose[i].numpy(), "betas": pred["betas"][i].numpy(),
                              "cam_full": pred["cam_full"][i, 0].numpy(),
                              "gt_pose": batch["pose"][i], "gt_betas": batch["betas"][i],
                              **{m: float(errors[m][i]) for m in ("mpjpe", "pa_mpjpe", "pve")}}
    return found, body


def test_predict_equals_the_evaluation_path(world, tmp_path):
    out = tmp_path / "out"
    rc = cli_main(["predict", str(world["images"]), "--checkpoint", world["checkpoint"],
                   "--detections", str(world["detections"]), "--out", str(out), "--smpl-dir", body_dir(),
                   "--batch-size", "4", "--device", "cpu"])
    assert rc == 0
    records = read_records(out / "predictions.jsonl")
    assert len(records) == N_PERSONS
    expected, body = eval_path(world)
    assert len(expected) == N_PERSONS
    for record in records:
        assert record["frame"] is None and record["person"] == 0
        assert len(record["pose"]) == 72 and len(record["betas"]) == 10 and len(record["cam_full"]) == 3
        assert np.asarray(record["joints_2d"]).shape == (24, 2)
        want = expected[world["keys"][record["image"]]]
        for name in ("pose", "betas", "cam_full"):
            np.testing.assert_allclose(record[name], want[name], atol=1e-4, err_msg=name)
        # the per-person errors the evaluation reports, from predict's parameters
        pose = torch.tensor(record["pose"], dtype=torch.float32)[None]
        betas = torch.tensor(record["betas"], dtype=torch.float32)[None]
        mine = body.forward_axis_angle(pose, betas)
        gt = body.forward_axis_angle(want["gt_pose"][None], want["gt_betas"][None])
        errors = mesh_protocol(mine.joints_h36m, gt.joints_h36m, mine.vertices, gt.vertices)
        for name in ("mpjpe", "pa_mpjpe", "pve"):
            assert abs(float(errors[name][0]) - want[name]) < 0.01, name
        # joints_2d: the J24 joints projected with cam_full and the image diagonal as focal
        width, height = cv2.imread(str(world["images"] / record["image"])).shape[1::-1]
        assert record["focal"] == pytest.approx(math.hypot(width, height), rel=1e-6)
        x, y, w, h = record["bbox"]
        centre = np.asarray(record["joints_2d"]).mean(axis=0)
        assert abs(centre[0] - (x + w / 2)) < 2 * w and abs(centre[1] - (y + h / 2)) < 2 * h
    summary = json.loads((out / "summary.json").read_text())
    assert summary["persons"] == N_PERSONS and summary["images"] == N_PERSONS
    assert set(summary["skipped"]) == set(SKIP_REASONS) and not any(summary["skipped"].values())


def test_two_persons_of_one_image_share_its_decode(world, tmp_path):
    """The same box twice in an image: two records, equal predictions (one decode cache)."""
    first = json.loads(world["detections"].read_text())[0]
    detections = tmp_path / "twice.json"
    detections.write_text(json.dumps([first, dict(first, score=0.5)]))
    summary = run_predict(PredictOptions(inputs=[str(world["images"] / first["image_id"])],
                                         checkpoint=world["checkpoint"], detections=str(detections),
                                         out=str(tmp_path / "out"), smpl_dir=body_dir(), device="cpu",
                                         quiet=True))
    records = read_records(summary["predictions"])
    assert [r["person"] for r in records] == [0, 1] and [r["score"] for r in records] == [0.9, 0.5]
    np.testing.assert_allclose(records[0]["pose"], records[1]["pose"], atol=1e-5)


@pytest.mark.ray
def test_predict_on_ray_data_gives_the_same_records(world, tmp_path):
    import ray
    common = dict(inputs=[str(world["images"])], checkpoint=world["checkpoint"],
                  detections=str(world["detections"]), smpl_dir=body_dir(), device="cpu", quiet=True)
    single = run_predict(PredictOptions(out=str(tmp_path / "single"), **common))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        on_ray = run_predict_ray(PredictOptions(out=str(tmp_path / "ray"), ray=True, actors=2, actor_cpus=0.5,
                                            crop_cpus=0.5, batch_size=4, **common))
    finally:
        ray.shutdown()
    assert on_ray["persons"] == single["persons"] == N_PERSONS
    assert on_ray["skipped"] == single["skipped"]
    mine, theirs = by_person(read_records(single["predictions"])), by_person(read_records(on_ray["predictions"]))
    assert set(mine) == set(theirs)
    for key, record in mine.items():
        other = theirs[key]
        assert set(other) == set(record)
        for name, value in record.items():
            if isinstance(value, list):
                np.testing.assert_allclose(other[name], value, atol=1e-4, err_msg=name)
            else:
                assert other[name] == value, name


@pytest.mark.ray
@pytest.mark.slow
def test_predict_on_ray_data_writes_parquet(world, tmp_path):
    """The cluster-written Parquet holds the same persons and numbers (frame -1: a still image)."""
    import pyarrow.parquet as pq
    import ray
    common = dict(inputs=[str(world["images"])], checkpoint=world["checkpoint"],
                  detections=str(world["detections"]), smpl_dir=body_dir(), device="cpu", quiet=True)
    single = run_predict(PredictOptions(out=str(tmp_path / "single"), **common))
    mine = by_person(read_records(single["predictions"]))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        parquet = run_predict_ray(PredictOptions(out=str(tmp_path / "parquet"), ray=True, ray_format="parquet",
                                             actors=2, actor_cpus=0.5, crop_cpus=0.5, batch_size=4, **common))
    finally:
        ray.shutdown()
    table = pq.read_table(parquet["predictions"]).to_pylist()
    assert parquet["persons"] == len(table) == N_PERSONS
    for row in table:
        record = mine[(row["image"], None, row["person"])]
        assert row["frame"] == -1
        for name in ("pose", "betas", "cam_full", "joints_2d"):
            np.testing.assert_allclose(np.asarray(row[name]).reshape(-1), np.ravel(record[name]), atol=1e-4)


def write_bad_inputs(world, folder):
    """A folder of good and bad inputs, and detections with every kind of bad box."""
    folder.mkdir()
    good = sorted(world["images"].iterdir())[:3]
    for path in good:
        (folder / path.name).write_bytes(path.read_bytes())
    data = good[0].read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "garbage.png").write_bytes(b"this is not an image at all" * 10)
    (folder / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 200)
    (folder / "nobody.jpg").write_bytes(data)
    boxes = {d["image_id"]: d for d in json.loads(world["detections"].read_text())}
    a, b, c = (boxes[p.name] for p in good)
    detections = [
        a,                                                            # good
        dict(a, bbox=[5000.0, 5000.0, 50.0, 80.0]),                   # box_outside_image
        b,                                                            # good
        dict(b, bbox=[float("nan"), 10.0, 20.0, 20.0]),               # degenerate_box
        dict(b, bbox=[10.0, 10.0, 0.0, 30.0]),                        # degenerate_box
        c,                                                            # good
        {"image_id": "ghost.jpg", "bbox": [1.0, 1.0, 20.0, 20.0], "score": 0.9},   # missing_image
        {"image_id": "ghost.jpg", "bbox": [2.0, 2.0, 20.0, 20.0], "score": 0.8},   # missing_image
        {"image_id": "truncated.jpg", "bbox": a["bbox"], "score": 0.9},
        {"image_id": "garbage.png", "bbox": a["bbox"], "score": 0.9},
        {"image_id": a["image_id"], "bbox": "not a box"},             # bad_detection
        "not an object",                                              # bad_detection
        {"image_id": a["image_id"], "bbox": a["bbox"], "category_id": 3},   # not a person: ignored
    ]
    (folder.parent / "bad_detections.json").write_text(json.dumps(detections))   # NaN as a bare token
    return folder.parent / "bad_detections.json"


def test_bad_inputs_are_skipped_counted_and_named(world, tmp_path, capsys, caplog):
    detections = write_bad_inputs(world, tmp_path / "inputs")
    out = tmp_path / "out"
    rc = cli_main(["predict", str(tmp_path / "inputs"), "--checkpoint", world["checkpoint"],
                   "--detections", str(detections), "--out", str(out), "--smpl-dir", body_dir(),
                   "--device", "cpu"])
    captured = capsys.readouterr()
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    expected = {"truncated_image": 1, "unreadable_image": 1, "unreadable_video": 1, "missing_image": 2,
                "bad_detection": 2, "no_detection": 1, "degenerate_box": 2, "box_outside_image": 1,
                "unread_detection": 2}
    assert summary["skipped"] == {reason: expected.get(reason, 0) for reason in SKIP_REASONS}
    assert summary["persons"] == 3
    assert len(read_records(out / "predictions.jsonl")) == 3
    line = [t for t in captured.out.splitlines() if t.startswith("[predict]") and "skipped:" in t][-1]
    for reason, count in expected.items():
        assert f"{reason} {count}" in line, reason
    # one clear line per skipped thing, naming it
    for needle in ("truncated.jpg", "garbage.png", "broken.mp4", "ghost.jpg", "nobody.jpg"):
        assert any(needle in r.getMessage() and "skip" in r.getMessage() for r in caplog.records), needle
    assert "Traceback" not in captured.err


def test_checkpoint_of_another_config_is_one_clear_error(world, tmp_path, capsys):
    other = tmp_path / "other.yaml"
    other.write_text("model:\n  backbone: mobilenetv3_small_050\n  decoder_hidden: 48\n"
                     "data:\n  crop_size: 64\nrois:\n  num_rois: 2\n")
    rc = cli_main(["predict", str(world["images"]), "--checkpoint", world["checkpoint"], "--config", str(other),
                   "--detections", str(world["detections"]), "--out", str(tmp_path / "out"),
                   "--smpl-dir", body_dir()])
    err = capsys.readouterr().err
    assert rc == 2
    # the settings that differ from the checkpoint's are named before any weight is loaded
    assert "model.decoder_hidden=48 (checkpoint: 32)" in err and str(other) in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if "error" in line]) == 1
    rc = cli_main(["predict", str(world["images"]), "--checkpoint", str(tmp_path), "--detections",
                   str(world["detections"]), "--smpl-dir", body_dir()])
    assert rc == 2 and "not a complete checkpoint" in capsys.readouterr().err
    assert cli_main(["predict", str(world["images"]), "--checkpoint", world["checkpoint"]]) == 2


def write_video(path, frames, fps=5.0):
    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    assert writer.isOpened()
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()


def test_video_render_and_vertices(world, tmp_path):
    first = json.loads(world["detections"].read_text())[0]
    rgb = cv2.cvtColor(cv2.imread(str(world["images"] / first["image_id"])), cv2.COLOR_BGR2RGB)
    write_video(tmp_path / "clip.mp4", [rgb, np.roll(rgb, 4, axis=1), np.roll(rgb, 8, axis=1)])
    x, y, w, h = first["bbox"]
    detections = [{"image_id": "clip.mp4", "frame": k, "bbox": [x + 4 * k, y, w, h], "score": 0.8} for k in (0, 2)]
    detections.append(first)
    (tmp_path / "dets.json").write_text(json.dumps(detections))
    out = tmp_path / "out"
    summary = run_predict(PredictOptions(
        inputs=[str(tmp_path / "clip.mp4"), str(world["images"] / first["image_id"])],
        checkpoint=world["checkpoint"], detections=str(tmp_path / "dets.json"), out=str(out),
        smpl_dir=body_dir(), device="cpu", render=True, save_vertices=True, quiet=True))
    assert summary["videos"] == 1 and summary["frames"] == 3 and summary["images"] == 1
    assert summary["persons"] == 3 and summary["skipped"]["no_detection"] == 1   # frame 1
    records = read_records(out / "predictions.jsonl")
    assert [(r["image"], r["frame"]) for r in records] == [("clip.mp4", 0), ("clip.mp4", 2),
                                                           (first["image_id"], None)]
    video = cv2.VideoCapture(str(out / "render" / "clip.mp4"))
    frames = []
    while True:
        ok, frame = video.read()
        if not ok:
            break
        frames.append(frame)
    assert len(frames) == 3 and frames[0].shape == rgb.shape
    overlay = cv2.imread(str(out / "render" / first["image_id"]))
    assert overlay.shape == rgb.shape
    # the mesh is drawn where the person is: the overlay differs from the picture inside
    # the box much more than outside it
    diff = np.abs(overlay.astype(np.int32) - cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)).sum(axis=2)
    inside = np.zeros(diff.shape, bool)
    inside[int(y):int(y + h), int(x):int(x + w)] = True
    assert diff[inside].mean() > 3 * diff[~inside].mean()
    stored = np.load(out / "vertices" / "vertices-000000.npz")
    assert stored["vertices"].shape == (3, 6890, 3) and list(stored["record"]) == [0, 1, 2]
    # the vertices are in the camera frame: their projection covers the person's box
    focal = records[2]["focal"]
    v = stored["vertices"][2]
    u = v[:, :2] / v[:, 2:] * focal + np.array(rgb.shape[1::-1]) / 2
    assert x - w < u[:, 0].mean() < x + 2 * w and y - h < u[:, 1].mean() < y + 2 * h


def test_detector_from_a_local_state_dict_counts_images_without_a_person(world, tmp_path):
    import torchvision
    torch.manual_seed(0)
    detector = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(weights=None,
                                                                                 weights_backbone=None)
    torch.save(detector.state_dict(), tmp_path / "detector.pt")
    images = sorted(world["images"].iterdir())[:2]
    summary = run_predict(PredictOptions(
        inputs=[str(p) for p in images], checkpoint=world["checkpoint"], detector=str(tmp_path / "detector.pt"),
        detector_arch="fasterrcnn_mobilenet_v3_large_320_fpn", out=str(tmp_path / "out"),
        smpl_dir=body_dir(), device="cpu", quiet=True))
    # an untrained detector scores every class near 1/91: no person box, each image counted
    assert summary["persons"] == 0 and summary["images"] == 2
    assert summary["skipped"]["no_detection"] == 2
    (tmp_path / "bad.pt").write_bytes(b"not a state dict")
    rc = cli_main(["predict", str(images[0]), "--checkpoint", world["checkpoint"], "--detector",
                   str(tmp_path / "bad.pt"), "--smpl-dir", body_dir(), "--out", str(tmp_path / "o2")])
    assert rc == 2


def test_bench_infer_quick(capsys):
    assert cli_main(["bench", "infer", "--json", "--quick"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["batch1_fp32_persons_per_s"] > 0 and result["batched_fp32_persons_per_s"] > 0
    assert result["seconds"] < 60


def test_box_rule_and_detection_files(tmp_path):
    from raytrain.predict.crop import check_box, square_box
    from raytrain.predict.inputs import SkipItem, Source, for_frame, load_detections
    # the training data's box: centre of the detection, side 1.2 x its larger side
    np.testing.assert_allclose(square_box([10, 20, 30, 60]), [25, 50, 72])
    np.testing.assert_allclose(square_box([10, 20, 30, 60], scale=1.0), [25, 50, 60])
    for bad in ([0, 0, 0, 5], [0, 0, 5, -1], [math.nan, 0, 5, 5], [0, math.inf, 5, 5]):
        with pytest.raises(SkipItem, match="degenerate_box"):
            square_box(bad)
    check_box(np.array([-5.0, 10, 12]), (100, 50))            # reaches into the image
    with pytest.raises(SkipItem, match="box_outside_image"):
        check_box(np.array([-6.5, 10, 12]), (100, 50))       # right edge at x = -0.5
    with pytest.raises(SkipItem, match="box_too_large"):
        check_box(np.array([50.0, 25, 401]), (100, 50))      # side over 4 x the longer side
    with pytest.raises(SkipItem, match="degenerate_box"):
        check_box(np.array([50.0, 25, 0.5]), (100, 50))      # under one pixel
    # a COCO dataset file: numeric ids name files; other categories are ignored
    dataset = {"images": [{"id": 7, "file_name": "a/b.jpg"}],
               "annotations": [{"image_id": 7, "bbox": [1, 2, 3, 4], "category_id": 1},
                               {"image_id": 7, "bbox": [1, 2, 3, 4], "category_id": 2},
                               {"image_id": 8, "bbox": [1, 2, 3, 4], "category_id": 1}]}
    (tmp_path / "coco.json").write_text(json.dumps(dataset))
    table = load_detections(str(tmp_path / "coco.json"))
    assert list(table.by_file) == ["a/b.jpg"] and table.refused.counts["bad_detection"] == 1   # id 8: no file
    found = table.for_source(Source("x/a/b.jpg", "a/b.jpg", "image", "a/b.jpg"))
    assert [d.bbox for d in found] == [(1.0, 2.0, 3.0, 4.0)]
    assert table.for_source(Source("x/b.jpg", "b.jpg", "image", "b.jpg")) == []
    results = [{"image_id": "clip.mp4", "bbox": [0, 0, 5, 5], "frame": 3},
               {"image_id": "clip.mp4", "bbox": [0, 0, 6, 6]},
               {"image_id": "x/photo.jpg", "bbox": [0, 0, 6, 6], "frame": -1}]
    (tmp_path / "results.json").write_text(json.dumps(results))
    table = load_detections(str(tmp_path / "results.json"))
    assert table.refused.counts["bad_detection"] == 1
    found = table.for_source(Source("videos/clip.mp4", "videos/clip.mp4", "video", "videos/clip.mp4"))
    assert [d.bbox[2] for d in for_frame(found, 3)] == [5.0] and [d.bbox[2] for d in for_frame(found, 0)] == [6.0]
    assert table.unmatched([]) == {"clip.mp4": 2}


def test_s3_prefix_and_glob_give_the_same_records(world, tmp_path):
    """Images under an S3 prefix (a moto server on loopback) predict like the local files."""
    boto3 = pytest.importorskip("boto3")
    pytest.importorskip("s3fs")
    with moto_s3() as endpoint:
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                              aws_access_key_id="testing", aws_secret_access_key="testing")
        client.create_bucket(Bucket="pictures")
        for path in sorted(world["images"].iterdir()):
            client.put_object(Bucket="pictures", Key=f"frames/day1/{path.name}", Body=path.read_bytes())
        options = {"key": "testing", "secret": "testing",
                   "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
        common = dict(checkpoint=world["checkpoint"], detections=str(world["detections"]), smpl_dir=body_dir(),
                      device="cpu", quiet=True)
        local = by_person(read_records(run_predict(PredictOptions(
            inputs=[str(world["images"])], out=str(tmp_path / "local"), **common))["predictions"]))
        for inputs in (["s3://pictures/frames"], ["s3://pictures/frames/day1/*.jpg"]):
            summary = run_predict(PredictOptions(inputs=inputs, out=str(tmp_path / "s3"), storage_options=options,
                                                 overwrite=True, **common))
            records = read_records(summary["predictions"])
            assert summary["persons"] == N_PERSONS and not any(summary["skipped"].values())
            for record in records:
                # the folder form names day1/<file>; detections match it by base name
                key = (record["image"].rsplit("/", 1)[-1], record["frame"], record["person"])
                np.testing.assert_allclose(record["pose"], local[key]["pose"], atol=1e-6)
