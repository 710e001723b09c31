"""The synthetic 3DPW release: rendered people in the raw 3DPW format, through the converter."""

from __future__ import annotations

import pickle
from dataclasses import replace

import cv2
import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from raytrain.data import ShardReader
from raytrain.data.convert import StorageConfig, convert_3dpw
from raytrain.synthetic.people import SyntheticConfig, rasterize, render_background
from raytrain.synthetic.pw3d_release import main, sequence_background, write_synthetic_3dpw

SIZE = (270, 480)  # portrait, 3DPW's 1080 x 1920 / 4
SEED = 5


@pytest.fixture(scope="module")
def release(tmp_path_factory, body_model):
    root = tmp_path_factory.mktemp("synthetic3dpw") / "3DPW"
    info = write_synthetic_3dpw(root, "test", sequences=2, frames=6, actors=2, seed=SEED,
                                image_size=SIZE, body_model=body_model)
    sequences = {}
    for name in info["sequences"]:
        with open(root / "sequenceFiles" / "test" / f"{name}.pkl", "rb") as handle:
            sequences[name] = pickle.load(handle, encoding="latin1")
    return info, sequences


@pytest.fixture(scope="module")
def converted(tmp_path_factory, release, body_model):
    info, _ = release
    out = tmp_path_factory.mktemp("synthetic3dpw-shards") / "3dpw-test"
    summary = convert_3dpw(info["root"], "test", str(out), body_model=body_model,
                           storage=StorageConfig(storage="full"), progress=False, printer=None)
    return summary, list(ShardReader(str(out), shuffle=False, rank=0, world_size=1))


def test_release_format(release):
    info, sequences = release
    assert info["split"] == "test" and len(info["sequences"]) == 2
    valid_total = 0
    for name, seq in sequences.items():
        assert seq["sequence"] == name
        assert set(seq["genders"]) <= {"m", "f"} and len(seq["genders"]) == 2
        assert all(np.shape(b) == (10,) for b in seq["betas"])
        assert all(p.shape == (6, 72) and t.shape == (6, 3) for p, t in zip(seq["poses"], seq["trans"]))
        assert seq["cam_poses"].shape == (6, 4, 4) and seq["poses2d"][0].shape == (6, 3, 18)
        K = seq["cam_intrinsics"]
        assert K[0, 0] == K[1, 1] and tuple(K[:2, 2]) == (SIZE[0] / 2, SIZE[1] / 2)
        # Non-trivial, slowly moving extrinsics: the world is not the camera frame.
        rot = seq["cam_poses"][:, :3, :3]
        assert np.all(np.abs(rot - np.eye(3)).max(axis=(1, 2)) > 0.1)
        assert np.all(np.linalg.norm(seq["cam_poses"][:, :3, 3], axis=1) > 0.5)
        np.testing.assert_allclose(rot @ np.transpose(rot, (0, 2, 1)), np.broadcast_to(np.eye(3), rot.shape),
                                   atol=1e-9)
        step = Rotation.from_matrix(rot[1:]) * Rotation.from_matrix(rot[:-1]).inv()
        assert np.all(step.magnitude() < 0.05)
        valid_total += int(sum(np.sum(v) for v in seq["campose_valid"]))
    flags = np.concatenate([v for seq in sequences.values() for v in seq["campose_valid"]])
    assert 0 < flags.sum() < flags.size  # some campose_valid zeros
    assert valid_total == info["valid_samples"]


def test_one_sample_per_valid_actor_frame(release, converted):
    info, sequences = release
    summary, samples = converted
    expected = sorted(f"3dpw/{name}/{frame:05d}/{actor}" for name, seq in sequences.items()
                      for actor, flags in enumerate(seq["campose_valid"])
                      for frame in np.flatnonzero(flags))
    assert summary.written == len(expected) == info["valid_samples"]
    assert not summary.skipped
    assert sorted(sample.key for sample in samples) == expected


def _silhouette(sample, body_model, K):
    """Pixel mask (H, W) of the sample's camera-frame ground-truth mesh."""
    with torch.no_grad():
        out = body_model.forward_axis_angle(torch.as_tensor(sample.pose[None]),
                                            torch.as_tensor(sample.betas[None]), sample.gender)
    vertices = out.vertices[0].double().numpy() + sample.cam_full
    uvw = vertices @ K.T
    pixel, _, _ = rasterize(uvw[:, :2] / uvw[:, 2:], 1.0 / vertices[:, 2], body_model.faces, SIZE)
    mask = np.zeros(SIZE[0] * SIZE[1], bool)
    mask[pixel] = True
    return mask.reshape(SIZE[1], SIZE[0]), out


def test_ground_truth_lands_on_the_rendered_people(release, converted, body_model):
    _, sequences = release
    _, samples = converted
    names = sorted(sequences)
    xs, ys = np.arange(SIZE[0]) + 0.5, np.arange(SIZE[1]) + 0.5
    silhouettes, person_masks, on_person = {}, {}, []
    for sample in samples:
        _, name, frame, _ = sample.key.split("/")
        seq = sequences[name]
        K = seq["cam_intrinsics"]
        assert sample.image_size == SIZE and sample.stored_size == SIZE  # full frame stored
        # The camera-frame ground truth reprojects onto the stored keypoints (< 1 px).
        joints = sample.joints_3d[:, :3].astype(np.float64)
        uvw = joints @ K.T
        np.testing.assert_allclose(uvw[:, :2] / uvw[:, 2:], sample.keypoints_2d[:, :2], atol=1.0)
        silhouette, out = _silhouette(sample, body_model, K)
        np.testing.assert_allclose(out.joints_j24[0].numpy() + sample.cam_full, joints, atol=1e-3)
        # Person pixels: where the stored image differs from the sequence's background.
        frame_key = (name, frame)
        if frame_key not in person_masks:
            background = render_background(sequence_background(SEED, names.index(name), SIZE), xs, ys)
            diff = np.abs(sample.image.astype(np.float32) - background).max(axis=2)
            person_masks[frame_key] = diff > 30  # JPEG noise on the texture: < 15
        silhouettes.setdefault(frame_key, []).append(silhouette)
        mask = person_masks[frame_key]
        # Most of the ground-truth silhouette is rendered person (another actor may occlude).
        assert mask[silhouette].mean() > 0.85, sample.key
        # The visible 2D keypoints fall on the rendered people.
        visible = sample.keypoints_2d[:, 2] > 0
        assert visible.sum() >= 20
        u = np.clip(np.floor(sample.keypoints_2d[visible, 0]).astype(int), 0, SIZE[0] - 1)
        v = np.clip(np.floor(sample.keypoints_2d[visible, 1]).astype(int), 0, SIZE[1] - 1)
        hits = mask[v, u] | silhouette[v, u]
        assert hits.mean() >= 0.8, sample.key
        on_person.append(mask[v, u].mean())
    assert np.mean(on_person) > 0.9
    # Nothing rendered outside the people: the person pixels of a frame lie in the union of
    # its actors' silhouettes, up to JPEG ringing at the edges (frames with every actor valid).
    for frame_key, masks in silhouettes.items():
        if len(masks) < 2:
            continue
        union = cv2.dilate(np.logical_or.reduce(masks).astype(np.uint8), np.ones((5, 5), np.uint8))
        assert union[person_masks[frame_key]].mean() > 0.97, frame_key


def test_motion_is_smooth(release, body_model):
    _, sequences = release
    for seq in sequences.values():
        for actor in range(2):
            joints = seq["jointPositions"][actor].reshape(6, 24, 3)
            cam = seq["cam_poses"]
            joints_cam = np.einsum("nij,nkj->nki", cam[:, :3, :3], joints) + cam[:, None, :3, 3]
            step = np.linalg.norm(np.diff(joints_cam, axis=0), axis=2)
            assert step.max() < 0.15  # metres per frame
            assert step.mean() > 1e-3  # but moving


def test_config_knobs_and_cli(tmp_path, body_model):
    """heading_range = tilt_scale = 0: everyone faces the camera upright in the camera frame."""
    cfg = replace(SyntheticConfig(), heading_range=0.0, tilt_scale=0.0, pose_scale=0.3)
    root = tmp_path / "easy"
    info = write_synthetic_3dpw(root, "validation", sequences=1, frames=3, seed=1, image_size=(120, 200),
                                pose_cfg=cfg, body_model=body_model)
    out = tmp_path / "easy-shards"
    convert_3dpw(root, "validation", str(out), body_model=body_model, progress=False, printer=None)
    samples = list(ShardReader(str(out), shuffle=False, rank=0, world_size=1))
    assert len(samples) == info["valid_samples"] > 0
    upright = Rotation.from_euler("x", np.pi)
    for sample in samples:
        assert (Rotation.from_rotvec(sample.pose[:3]) * upright.inv()).magnitude() < 1e-3
    # The command line entry point.
    assert main(["--root", str(tmp_path / "cli"), "--split", "test", "--sequences", "1",
                 "--frames", "2", "--image-size", "90", "160", "--heading-range", "0.5"]) == 0
    assert len(list((tmp_path / "cli" / "imageFiles" / "synthetic_00").glob("image_*.jpg"))) == 2
    assert len(list((tmp_path / "cli" / "sequenceFiles" / "test").glob("*.pkl"))) == 1
