"""Synthetic people: exact labels tied to the geometry, determinism, storage, sharding."""
import json
import logging

import numpy as np
import pytest
import torch

from raytrain.body.model import root_joint_model
from raytrain.data.augment import AugmentParams, augment_cam_full, augment_joints_3d, augment_pose
from raytrain.data.schema import decode_sample
from raytrain.geometry import cam_crop_to_full, perspective_projection
from raytrain.synthetic.people import (
    SyntheticConfig,
    SyntheticGenerator,
    generate_synthetic_samples,
    joint_limits,
    shard_synthetic,
)


@pytest.fixture(scope="module")
def samples(body_model):
    encoded = list(generate_synthetic_samples(8, seed=5, body_model=body_model, chunk=4))
    return [decode_sample(e, decode_image=True) for e in encoded]


def test_reprojection_through_crop_camera_matches_keypoints(samples):
    """GT full camera -> crop camera of the stored box -> cam_crop_to_full -> projection."""
    for s in samples:
        (cx, cy, b), (w, h), f = s.box.astype(np.float64), s.image_size, s.focal
        tx, ty, tz = s.cam_full.astype(np.float64)
        scale = 2 * f / (b * tz)  # weak-perspective crop camera of this box (docs/method.md §4)
        crop_cam = torch.tensor([[scale, tx - 2 * (cx - w / 2) / (b * scale), ty - 2 * (cy - h / 2) / (b * scale)]],
                                dtype=torch.float64)
        box = torch.tensor([[cx, cy, b]], dtype=torch.float64)
        size = torch.tensor([[w, h]], dtype=torch.float64)
        focal = torch.tensor([f], dtype=torch.float64)
        full = cam_crop_to_full(crop_cam, box, size, focal)
        body_joints = torch.tensor(s.joints_3d[None, :, :3] - s.cam_full, dtype=torch.float64)
        pixels = perspective_projection(body_joints, full, focal, size)[0].numpy()
        error = np.linalg.norm(pixels - s.keypoints_2d[:, :2], axis=1)
        assert error.max() < 1.0, (s.key, error.max())


def test_labels_and_storage(samples):
    for s in samples:
        k = s.keypoints_2d
        assert (k[:, 2] == 1).all() and (s.joints_3d[:, 3] == 1).all() and (s.joints_3d[:, 2] > 0.5).all()
        half = s.box[2] / 2
        assert (np.abs(k[:, :2] - s.box[:2]) <= half).all(), s.key  # keypoints inside the padded box
        assert s.stored_size == (689, 689) and s.image.shape == (689, 689, 3)
        assert s.has_smpl and s.has_3d and s.has_2d and s.source == "synthetic"
        # the person is drawn: pixels at the projected pelvis/thorax differ from the image corners
        stored = k[[14, 15], :2] @ s.affine[:, :2].T + s.affine[:, 2]
        assert stored.min() > 0 and stored.max() < 689


def test_poses_respect_joint_limits(samples):
    low, high = joint_limits()
    assert (low <= high).all()
    for s in samples:
        assert np.abs(s.pose).max() < np.pi + 1e-5 and np.abs(s.betas).max() <= 2.5 + 1e-6


def test_deterministic_per_seed_and_chunking(body_model):
    generator = SyntheticGenerator(SyntheticConfig(image_sizes=((480, 360),)), body_model)
    a = generator.encoded(1, range(3))
    b = generator.encoded(1, [0]) + generator.encoded(1, [1, 2])
    c = generator.encoded(2, range(3))
    assert [x["jpg"] for x in a] == [x["jpg"] for x in b]
    assert [x["npz"] for x in a] == [x["npz"] for x in b] and [x["json"] for x in a] == [x["json"] for x in b]
    assert all(x["jpg"] != y["jpg"] for x, y in zip(a, c))


def test_augmented_labels_match_the_posed_body(body_model, samples):
    """Flip and rotation of the labels equal posing the body with the augmented pose/camera."""
    root = root_joint_model(body_model)
    s = samples[0]
    for params in (AugmentParams(angle=0.5), AugmentParams(flip=True, angle=-0.3)):
        pose = torch.tensor(augment_pose(params, s.pose)[None])
        out = body_model.forward_axis_angle(pose, torch.tensor(s.betas[None]))
        cam = augment_cam_full(params, s.cam_full, s.betas, root)
        posed = out.joints_j24[0].detach().numpy() + cam
        expected = augment_joints_3d(params, s.joints_3d)[:, :3]
        tolerance = 2e-3 if not params.flip else 2e-2  # flip: exact only for a symmetric body
        np.testing.assert_allclose(posed, expected, atol=tolerance)


def test_shard_synthetic_writes_manifest(tmp_path):
    manifest = shard_synthetic(str(tmp_path / "syn"), n=5, seed=0, workers=1, maxcount=3,
                               cfg=SyntheticConfig(image_sizes=((320, 240),)))
    assert manifest["num_samples"] == 5 and len(manifest["shards"]) == 2
    on_disk = json.loads((tmp_path / "syn" / "manifest.json").read_text())
    assert on_disk["num_samples"] == 5 and on_disk["source"] == "synthetic"


def test_long_render_resumes_after_its_last_whole_part(tmp_path, monkeypatch, caplog):
    """A split longer than RENDER_PART is rendered in parts; interrupted, it keeps the parts
    it finished and renders only the rest, and the set equals a render in one go."""
    from raytrain.data.reader import ShardReader
    from raytrain.synthetic import people
    cfg = SyntheticConfig(image_sizes=((320, 240),), crop_size=64)
    monkeypatch.setattr(people, "RENDER_PART", 4)
    real, calls = people.shard_synthetic, []

    def stopping(*args, **kwargs):
        calls.append(kwargs["start"])
        if len(calls) == 3:
            raise KeyboardInterrupt("the machine was needed elsewhere")
        return real(*args, **kwargs)

    monkeypatch.setattr(people, "shard_synthetic", stopping)
    with pytest.raises(KeyboardInterrupt):
        people.ensure_synthetic_shards(tmp_path / "split", 10, 7, cfg, maxcount=3)
    assert not (tmp_path / "split" / "manifest.json").exists()
    calls.clear()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="raytrain"):
        people.ensure_synthetic_shards(tmp_path / "split", 10, 7, cfg, maxcount=3)
    assert calls == [8]                                          # only the part it had not finished
    assert [r.getMessage().split(" into ")[0] for r in caplog.records
            if r.getMessage().startswith("rendered")] == ["rendered 10 of 10 people"]   # progress per part
    assert not [r for r in caplog.records if r.levelno >= logging.INFO and r.getMessage().startswith("wrote")]
    people.ensure_synthetic_shards(tmp_path / "split", 10, 7, cfg, maxcount=3)
    assert calls == [8]                                          # the finished split is reused
    real(str(tmp_path / "whole"), n=10, seed=7, maxcount=3, cfg=cfg)
    resumed = [(s.key, s.jpeg) for s in ShardReader(str(tmp_path / "split"), shuffle=False, decode_images=False)]
    whole = [(s.key, s.jpeg) for s in ShardReader(str(tmp_path / "whole"), shuffle=False, decode_images=False)]
    assert len(resumed) == 10 and resumed == whole
    assert sorted(p.name for p in (tmp_path / "split").iterdir() if not p.name.endswith(".tar")) == [
        "manifest.json", "synthetic.json"]
