"""Multi-RoI cropper, augmentation, collate and device crop (no mocks, small real data)."""
import dataclasses

import cv2
import numpy as np
import pytest
import torch

from raytrain.config import DataConfig
from raytrain.data.augment import (
    AugmentParams,
    augment_box,
    augment_cam_full,
    augment_joints_3d,
    augment_keypoints,
    augment_pose,
)
from raytrain.data.collate import FLAG_KEYS, FLOAT_KEYS, batch_to_torch, collate_crops
from raytrain.data.crop import MultiRoICropper
from raytrain.data.device_crop import DeviceCropPrep, collate_regions, crop_batch, grid_theta, grid_to_region
from raytrain.data.schema import decode_sample
from raytrain.synthetic.people import SyntheticConfig, SyntheticGenerator, with_storage

HD = SyntheticConfig(image_sizes=((1920, 1080),))


@pytest.fixture(scope="module")
def hd_pairs(body_model):
    """The same 4 synthetic 1920x1080 scenes stored as context regions and as full frames."""
    context = SyntheticGenerator(HD, body_model).encoded(3, range(4))
    full = SyntheticGenerator(with_storage(HD, "full"), body_model).encoded(3, range(4))
    return context, full


def _samples(encoded):
    return [decode_sample(e, decode_image=False) for e in encoded]


def _inside(box, width, height, margin=2.0):
    half = box[2] / 2 + margin
    return box[0] - half >= 0 and box[1] - half >= 0 and box[0] + half <= width and box[1] + half <= height


def _inside_stored(sample, box):
    """RoI box (full px) inside the stored region and inside the full frame."""
    a = np.asarray(sample.affine, np.float64)
    corners = np.array([[box[0] - box[2] / 2, box[1] - box[2] / 2], [box[0] + box[2] / 2, box[1] + box[2] / 2]])
    stored = corners @ a[:, :2].T + a[:, 2]
    w, h = sample.stored_size
    in_region = (stored >= 1).all() and (stored[:, 0] <= w - 1).all() and (stored[:, 1] <= h - 1).all()
    return in_region and _inside(box, *sample.image_size)


@pytest.mark.parametrize("augment", [None, DataConfig(rot_jitter_deg=0.0)])
def test_context_and_full_frame_crops_agree(hd_pairs, augment):
    context, full = (_samples(e) for e in hd_pairs)
    cropper = MultiRoICropper("paper", 5, augment=augment)
    compared = 0
    for a, b in zip(context, full):
        out_a, out_b = cropper(a, np.random.default_rng(7)), cropper(b, np.random.default_rng(7))
        np.testing.assert_array_equal(out_a["boxes"], out_b["boxes"])
        for m, box in enumerate(out_a["boxes"]):
            if not augment and not _inside_stored(a, box):
                continue
            if augment and not _inside(box, *a.image_size):
                continue
            diff = np.abs(out_a["images"][m].astype(int) - out_b["images"][m].astype(int))
            assert diff.mean() < 5.0, (a.key, m, diff.mean())  # JPEG noise at q90 is ~2-3
            compared += 1
    assert compared >= 8


def test_context_storage_at_most_half_of_full_frame(hd_pairs):
    context, full = hd_pairs
    ctx_bytes = np.mean([len(e["jpg"]) for e in context])
    full_bytes = np.mean([len(e["jpg"]) for e in full])
    assert ctx_bytes <= 0.5 * full_bytes, (ctx_bytes, full_bytes)


def _labels(rng):
    return dict(box=np.array([700.0, 400.0, 300.0]), keypoints=rng.uniform(0, 900, (24, 3)).astype(np.float32),
                joints=rng.normal(0, 1, (24, 4)).astype(np.float32), pose=rng.normal(0, 0.5, 72).astype(np.float32),
                cam=np.array([0.1, -0.2, 6.0]), betas=rng.normal(0, 1, 10))


def test_flip_twice_is_identity_on_labels():
    rng = np.random.default_rng(0)
    lab, size, flip = _labels(rng), (1280, 720), AugmentParams(flip=True)
    once = augment_keypoints(flip, lab["keypoints"], size)
    assert not np.allclose(once, lab["keypoints"])
    np.testing.assert_allclose(augment_keypoints(flip, once, size), lab["keypoints"], atol=1e-4)
    twice = augment_joints_3d(flip, augment_joints_3d(flip, lab["joints"]))
    np.testing.assert_allclose(twice, lab["joints"], atol=1e-6)
    np.testing.assert_allclose(augment_pose(flip, augment_pose(flip, lab["pose"])), lab["pose"], atol=1e-6)
    cam = augment_cam_full(flip, augment_cam_full(flip, lab["cam"], lab["betas"]), lab["betas"])
    np.testing.assert_allclose(cam, lab["cam"], atol=1e-6)
    box = augment_box(flip, augment_box(flip, lab["box"], size), size)
    np.testing.assert_allclose(box, lab["box"], atol=1e-9)


def test_rotation_keeps_projection_consistent():
    """Rotating the virtual image = rolling the camera: projected 3D joints follow the 2D ones."""
    rng = np.random.default_rng(1)
    size, focal = np.array([1280.0, 720.0]), 1500.0
    joints = np.concatenate([rng.normal(0, 0.4, (24, 2)), rng.uniform(4, 6, (24, 1)), np.ones((24, 1))], 1)
    keypoints = np.concatenate([joints[:, :2] / joints[:, 2:3] * focal + size / 2, np.ones((24, 1))], 1)
    params = AugmentParams(flip=True, angle=0.4)
    j = augment_joints_3d(params, joints.astype(np.float32)).astype(np.float64)
    k = augment_keypoints(params, keypoints.astype(np.float32), size)
    np.testing.assert_allclose(j[:, :2] / j[:, 2:3] * focal + size / 2, k[:, :2], atol=1e-2)


@pytest.mark.parametrize("kind", ["paper", "random"])
def test_shapes_for_one_to_five_rois(hd_pairs, kind):
    samples = _samples(hd_pairs[0])[:2]
    for m in range(1, 6):
        cropper = MultiRoICropper(kind, m, crop_size=64, augment=DataConfig(occlusion_prob=0.3))
        outs = [cropper(s, np.random.default_rng(m)) for s in samples]
        assert outs[0]["images"].shape == (m, 64, 64, 3) and outs[0]["images"].dtype == np.uint8
        batch = collate_crops(outs)
        assert batch["images"].shape == (2, m, 3, 64, 64) and batch["images"].dtype == torch.uint8
        assert batch["boxes"].shape == (2, m, 3)
        assert batch["keypoints_2d"].shape == (2, 24, 3) and batch["joints_3d"].shape == (2, 24, 4)
        assert batch["pose"].shape == (2, 72) and batch["cam_full"].shape == (2, 3)
        assert batch["has_cam"].all() and batch["keys"] == [s.key for s in samples]
        np.testing.assert_allclose(batch["boxes"][:, 0].numpy(), np.stack([o["boxes"][0] for o in outs]))


def test_random_schedule_reproducible_per_seed(hd_pairs):
    sample = _samples(hd_pairs[0])[0]
    cropper = MultiRoICropper("random", 5, augment=DataConfig(roi_color_jitter=0.3))
    a, b = cropper(sample, np.random.default_rng(11)), cropper(sample, np.random.default_rng(11))
    c = cropper(sample, np.random.default_rng(12))
    np.testing.assert_array_equal(a["boxes"], b["boxes"])
    np.testing.assert_array_equal(a["images"], b["images"])
    assert not np.allclose(a["boxes"], c["boxes"])


def test_reduced_decode_matches_full_decode(hd_pairs):
    """A full frame where every RoI spans >= 2S stored px is decoded at 1/2: same crops."""
    sample = _samples(hd_pairs[1])[0]
    fast = MultiRoICropper("paper", 3, crop_size=128, reduced_decode=True)
    slow = MultiRoICropper("paper", 3, crop_size=128, reduced_decode=False)
    assert fast.plan(sample, np.random.default_rng(0)).reduction >= 2
    a, b = fast(sample, np.random.default_rng(0)), slow(sample, np.random.default_rng(0))
    assert np.abs(a["images"].astype(int) - b["images"].astype(int)).mean() < 4.0


def _device_and_cpu(cropper, samples, seed):
    """The same samples and generators through the device path (crops made here, on the
    CPU device) and through the CPU cropper -> (device batch, CPU batch, params drawn)."""
    prep = DeviceCropPrep(cropper)
    items = [prep(s, np.random.default_rng([seed, i])) for i, s in enumerate(samples)]
    device = crop_batch(batch_to_torch(collate_regions(items)), cropper.crop_size)
    cpu = collate_crops([cropper(s, np.random.default_rng([seed, i])) for i, s in enumerate(samples)])
    params = [cropper.plan(s, np.random.default_rng([seed, i])).params for i, s in enumerate(samples)]
    return device, cpu, params


def _assert_same_labels(device, cpu):
    assert device["keys"] == cpu["keys"]
    # only crops made in a worker's shared buffer carry its name (for Loader.release)
    assert set(device) == set(cpu) - {"buffer"}, set(device) ^ set(cpu)
    for name in (*FLOAT_KEYS, *FLAG_KEYS):
        torch.testing.assert_close(device[name], cpu[name], rtol=0, atol=0)


@pytest.mark.parametrize("storage", [0, 1])
def test_device_crop_matches_cpu_crop(hd_pairs, storage):
    """Context regions and full frames (decoded at a DCT reduction), with flips, rotations,
    scale, colour and per-RoI colour jitter and occluders: the device crops equal the CPU
    cropper's exact warps within interpolation error; the labels are identical."""
    samples = _samples(hd_pairs[storage])
    augment = DataConfig(occlusion_prob=0.5, roi_color_jitter=0.3)
    cropper = MultiRoICropper("paper", 5, crop_size=96, augment=augment, fast_resize=False)
    drawn = []
    for seed in range(3):
        device, cpu, params = _device_and_cpu(cropper, samples, seed)
        _assert_same_labels(device, cpu)
        assert device["images"].shape == cpu["images"].shape == (4, 5, 3, 96, 96)
        assert device["images"].dtype == torch.uint8
        diff = (device["images"].int() - cpu["images"].int()).abs()
        assert diff.float().mean() < 0.5 and diff.max() <= 2, (diff.float().mean(), diff.max())
        drawn += params
    assert any(p.flip for p in drawn) and any(p.angle != 0 for p in drawn)
    assert any(p.occluder is not None for p in drawn) and any(p.scale != 1 for p in drawn)
    if storage == 1:  # full frames: the workers decode at a reduced size
        assert cropper.plan(samples[0], np.random.default_rng(0)).reduction >= 2


#: The augmentation fields of DataConfig: those marked ``augment`` in their metadata.
AUGMENT_FIELDS = [f.name for f in dataclasses.fields(DataConfig) if f.metadata.get("augment")]
#: A value that turns each augmentation field on (0 turns it off).
AUGMENT_ON = {"flip_prob": 0.5, "scale_jitter": 0.25, "rot_jitter_deg": 30.0, "color_jitter": 0.4,
              "occlusion_prob": 0.5, "roi_color_jitter": 0.3}


class _ReadFields:
    """A DataConfig that records which of its fields are read."""

    def __init__(self, data: DataConfig):
        self._data, self.read = data, set()

    def __getattr__(self, name):
        self.read.add(name)
        return getattr(self._data, name)


def test_the_cropper_reads_exactly_the_augmentation_fields(hd_pairs):
    """A field the augmentation reads is marked ``augment`` (so the test below covers it),
    and every marked field is read."""
    assert set(AUGMENT_ON) >= set(AUGMENT_FIELDS), f"give {set(AUGMENT_FIELDS) - set(AUGMENT_ON)} an 'on' value"
    data = _ReadFields(DataConfig(**AUGMENT_ON))
    cropper = MultiRoICropper("paper", 5, crop_size=32, augment=data)
    for i, sample in enumerate(_samples(hd_pairs[0])):
        cropper(sample, np.random.default_rng(i))
    assert data.read == set(AUGMENT_FIELDS), data.read ^ set(AUGMENT_FIELDS)


@pytest.mark.parametrize("name", [*AUGMENT_FIELDS, "all"])
def test_device_crop_renders_every_augmentation_field(hd_pairs, name):
    """Each augmentation field of DataConfig alone (the others 0), then all together:
    it changes the CPU crops or labels, and the device path (run here on the CPU)
    renders the same: identical labels, crops within interpolation error."""
    assert name == "all" or name in AUGMENT_ON, f"data.{name}: a new augmentation field needs an 'on' value"
    on = AUGMENT_ON if name == "all" else {name: AUGMENT_ON[name]}
    plain = MultiRoICropper("paper", 5, crop_size=64, fast_resize=False,
                            augment=DataConfig(**{field: 0 for field in AUGMENT_FIELDS}))
    cropper = MultiRoICropper("paper", 5, crop_size=64, fast_resize=False,
                              augment=DataConfig(**{**{field: 0 for field in AUGMENT_FIELDS}, **on}))
    changed = False
    for storage, seed in ((0, 0), (0, 1), (1, 2)):  # context regions, full frames (reduced decode)
        samples = _samples(hd_pairs[storage])
        device, cpu, _ = _device_and_cpu(cropper, samples, seed)
        _assert_same_labels(device, cpu)
        diff = (device["images"].int() - cpu["images"].int()).abs()
        assert diff.float().mean() < 0.5 and diff.max() <= 2, (diff.float().mean(), diff.max())
        _, off, _ = _device_and_cpu(plain, samples, seed)
        changed |= (cpu["images"].int() - off["images"].int()).abs().max() > 2
        changed |= any(not torch.equal(cpu[key], off[key]) for key in ("boxes", "keypoints_2d", "pose"))
    assert changed, f"data.{name} changes nothing"


def test_grid_theta_hand_worked():
    """Crop px = region px - 10 (S = W = H = 100): normalised crop u -> crop px 50 (u + 1)
    -> region px + 10 -> normalised u + 0.2; a region twice as wide halves the x terms."""
    shift = np.array([[[1.0, 0, -10], [0, 1, -10], [0, 0, 1]]])
    to_region = grid_to_region(shift, 100)
    np.testing.assert_allclose(grid_theta(to_region, (100, 100)), [[[1, 0, 0.2], [0, 1, 0.2]]], atol=1e-6)
    np.testing.assert_allclose(grid_theta(to_region, (200, 100)), [[[0.5, 0, -0.4], [0, 1, 0.2]]], atol=1e-6)


def test_device_crop_wrong_params_differ(hd_pairs):
    """The comparison can fail: another generator seed gives other crops and labels."""
    samples = _samples(hd_pairs[0])
    cropper = MultiRoICropper("paper", 5, crop_size=64, augment=DataConfig(roi_color_jitter=0.3))
    device, _, _ = _device_and_cpu(cropper, samples, 0)
    _, cpu, _ = _device_and_cpu(cropper, samples, 1)
    assert (device["images"].int() - cpu["images"].int()).abs().float().mean() > 5
    assert not torch.equal(device["boxes"], cpu["boxes"])


def test_loader_with_device_crop_matches_cpu_loader(hd_pairs, tmp_path):
    """``data.device_crop``: the training loader's workers send decoded regions, the crops
    are made after the move to the device (here the CPU); same samples, same order, same
    labels as the default loader, crops within the CPU fast path's interpolation error."""
    from raytrain.bench.data import bench_config, write_bench_shards
    from raytrain.data.pipeline import Loader
    from raytrain.train.loop import batch_to_device

    write_bench_shards(hd_pairs[0], str(tmp_path), copies=3, per_shard=6)
    batches = {}
    for device_crop in (False, True):
        cfg = bench_config(str(tmp_path), workers=1)
        cfg.data.crop_size, cfg.data.shuffle_buffer, cfg.data.occlusion_prob = 64, 8, 0.5
        cfg.data.roi_color_jitter = 0.3
        cfg.data.device_crop = device_crop
        with Loader(cfg, "train", batch_size=4, seed=0) as loader:
            batches[device_crop] = [batch_to_device(b, torch.device("cpu"), 64) for b in loader.epoch(0)]
    cpu, device = batches[False], batches[True]
    assert len(cpu) == len(device) == 3
    for a, b in zip(cpu, device):
        assert b["images"].shape == a["images"].shape == (4, 5, 3, 64, 64)
        _assert_same_labels(b, a)
        assert b["gender"] == a["gender"]
        diff = (a["images"].int() - b["images"].int()).abs().float()
        assert diff.mean() < 2.0, diff.mean()


@pytest.mark.parametrize("storage", [0, 1])
def test_resize_fast_path_matches_warp(hd_pairs, storage):
    """Axis-aligned RoIs go through cv2.resize of a rectangle: same crops as warpAffine
    within interpolation error (sampling grid off by <= 0.5 stored px at the border)."""
    samples = _samples(hd_pairs[storage])
    augment = DataConfig(rot_jitter_deg=0.0, roi_color_jitter=0.3)  # flips, scale jitter, colours
    fast = MultiRoICropper("paper", 5, augment=augment)
    warp = MultiRoICropper("paper", 5, augment=augment, fast_resize=False)
    diffs = []
    for seed in range(3):
        for i, sample in enumerate(samples):
            a = fast(sample, np.random.default_rng([seed, i]))
            b = warp(sample, np.random.default_rng([seed, i]))
            np.testing.assert_array_equal(a["boxes"], b["boxes"])
            for name in ("keypoints_2d", "joints_3d", "pose", "cam_full"):
                np.testing.assert_array_equal(a[name], b[name])
            diffs += [np.abs(x.astype(int) - y.astype(int)).mean() for x, y in zip(a["images"], b["images"])]
    assert np.mean(diffs) <= 2.0 and max(diffs) <= 3.5, (np.mean(diffs), max(diffs))


def test_resize_roi_on_smooth_image_is_exact_to_interpolation():
    """On a linear ramp, resize (including mirrored RoIs) equals the exact bilinear warp."""
    from raytrain.data.crop import _resize_roi
    ys, xs = np.mgrid[0:300, 0:400].astype(np.float64)
    image = np.stack([xs * 0.5, ys * 0.7, (xs + ys) * 0.3], -1).clip(0, 255).astype(np.uint8)
    out = np.zeros((64, 64, 3), np.uint8)
    for left, right, top, bottom in [(10.3, 150.8, 20.6, 161.1), (150.8, 10.3, 20.6, 161.1),
                                     (50.5, 90.0, 40.2, 79.7)]:
        assert _resize_roi(image, out, left, right, top, bottom)
        u = (np.arange(64) + 0.5) / 64
        x = left + u * (right - left) - 0.5
        y = top + u * (bottom - top) - 0.5
        expected = np.stack([x[None, :] * 0.5 + 0 * y[:, None], y[:, None] * 0.7 + 0 * x[None, :],
                             (x[None, :] + y[:, None]) * 0.3], -1)
        assert np.abs(out - expected).mean() < 1.0
    assert not _resize_roi(image, out, -5.0, 100.0, 0.0, 105.0)  # leaves the image: warp


def test_augment_pose_rolls_the_root_like_scipy():
    """The cv2.Rodrigues root roll equals the rotation composed with scipy, to float32 precision."""
    from scipy.spatial.transform import Rotation

    from raytrain.body.joints import flip_smpl_pose
    rng = np.random.default_rng(0)
    for i in range(50):
        params = AugmentParams(flip=bool(i % 2), angle=float(rng.normal() * 0.8))
        pose = rng.normal(0, 0.7, 72).astype(np.float32)
        expected = flip_smpl_pose(pose.astype(np.float64)) if params.flip else pose.astype(np.float64)
        c, s = np.cos(params.angle), np.sin(params.angle)
        roll = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
        expected[:3] = Rotation.from_matrix(roll @ Rotation.from_rotvec(expected[:3]).as_matrix()).as_rotvec()
        np.testing.assert_allclose(augment_pose(params, pose), expected, atol=1e-5)


def test_four_channel_warp_equals_three_channel_warp(hd_pairs):
    """Rotated RoIs are warped through an RGBA copy (OpenCV's SIMD path): same pixels as
    cv2.warpAffine on the RGB image."""
    from raytrain.data.augment import virtual_transform
    from raytrain.data.crop import crop_transform, cv2_affine, invert_affine

    cropper = MultiRoICropper("paper", 5, crop_size=96, augment=DataConfig())
    for sample in _samples(hd_pairs[0])[:4]:
        draws = (cropper.draw(sample, np.random.default_rng(seed)) for seed in range(100))
        params, boxes = next((p, b) for p, b in draws if p.angle != 0.0)
        stored_to_virtual = virtual_transform(params, sample.image_size) @ invert_affine(sample.affine)
        image = cv2.imdecode(np.frombuffer(sample.jpeg, np.uint8), cv2.IMREAD_COLOR_RGB)
        crops = cropper.warp(image, stored_to_virtual, boxes)
        for m in range(len(boxes)):
            matrix = cv2_affine(crop_transform(boxes[m], 96) @ stored_to_virtual)
            expected = cv2.warpAffine(image, matrix, (96, 96), flags=cv2.INTER_LINEAR,
                                      borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))
            np.testing.assert_array_equal(crops[m], expected)
