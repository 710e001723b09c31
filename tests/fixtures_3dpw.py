"""A tiny fake 3DPW release in the real on-disk format, built on the fly.

    info = make_3dpw_release(tmp_path / "3DPW", body_model)

Layout as the release: ``sequenceFiles/test/<sequence>.pkl`` (dicts pickled with
protocol 2, as the python-2 release files, with numpy arrays and lists of per-actor
arrays) and ``imageFiles/<sequence>/image_XXXXX.jpg`` (real JPEGs). Two sequences, two
actors each (one 'm' with (10,) betas, one 'f' with (300,) betas), a few frames, some
``campose_valid`` zeros. Camera extrinsics are arbitrary rotations and translations, so
a converter that does not apply them properly gets the camera-frame truth wrong.

With a ``body_model``, ``jointPositions`` (world-frame SMPL joints) and ``poses2d``
(OpenPose-18 of the projected joints, one joint marked undetected) are consistent with
the SMPL parameters; without, they are zeros.

The release writing and labelling helpers are those of ``raytrain.synthetic.pw3d_release``
(which renders people into the images; here the images are noise, which is all the
converter tests need).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy.spatial.transform import Rotation

from raytrain.body.joints import J24_TO_OPENPOSE18
from raytrain.synthetic.pw3d_release import (
    intrinsics_matrix,
    joint_labels,
    world_from_camera,
    write_jpeg,
    write_sequence_file,
)

#: (sequence name, campose_valid per actor)
SEQUENCES = (
    ("courtyard_fixture_00", ((1, 1, 0, 1), (1, 0, 1, 1))),
    ("downtown_fixture_01", ((1, 1, 1), (0, 1, 0))),
)
WIDTH, HEIGHT = 270, 480  # 3DPW's portrait 1080 x 1920, scaled by 1/4
FX, FY = 490.0, 494.0
#: A (actor, frame, OpenPose-18 joint) whose detection confidence is 0 in every sequence.
UNDETECTED = (0, 0, 4)  # actor 0's right wrist in frame 0
#: J24 index of that joint (OpenPose-18 4 = right wrist = J24 6).
UNDETECTED_J24 = 6
assert J24_TO_OPENPOSE18[UNDETECTED_J24] == UNDETECTED[2]


def intrinsics() -> np.ndarray:
    return intrinsics_matrix(FX, FY, (WIDTH, HEIGHT))


def _image(rng: np.random.Generator) -> np.ndarray:
    ramp = np.linspace(30, 220, HEIGHT, dtype=np.float32)[:, None, None]
    noise = rng.integers(0, 35, size=(HEIGHT, WIDTH, 3)).astype(np.float32)
    return np.clip(ramp + noise, 0, 255).astype(np.uint8)


def _sequence(name: str, valid, rng: np.random.Generator, body_model) -> dict:
    frames = len(valid[0])
    actors = len(valid)
    rot_c = Rotation.random(frames, random_state=int(rng.integers(2**31))).as_matrix()
    t_c = rng.normal(scale=0.5, size=(frames, 3))
    cam_poses = np.tile(np.eye(4), (frames, 1, 1))
    cam_poses[:, :3, :3], cam_poses[:, :3, 3] = rot_c, t_c
    K = intrinsics()
    data = {"sequence": name, "genders": [], "poses": [], "betas": [], "trans": [],
            "campose_valid": [], "poses2d": [], "jointPositions": [],
            "cam_poses": cam_poses, "cam_intrinsics": K,
            "img_frame_ids": np.arange(frames)}
    for actor in range(actors):
        # The person stands upright in the camera frame (SMPL y up, camera y down).
        yaw = rng.uniform(-np.pi, np.pi) + rng.normal(scale=0.1, size=frames)
        orient_cam = Rotation.from_euler("x", np.pi) * Rotation.from_euler("y", yaw[:, None])
        root_cam = np.array([[-0.35 + 0.7 * actor, 0.1, 6.0]]) + rng.normal(scale=0.05, size=(frames, 3))
        pose_cam = np.concatenate([orient_cam.as_rotvec(),
                                   rng.normal(scale=0.15, size=(frames, 69))], axis=1)
        # World frame: R_w = R_c^T R_cam, trans = R_c^T (root_cam - t_c) (J0 taken as 0).
        poses, trans = world_from_camera(pose_cam, root_cam, cam_poses, np.zeros(3))
        betas = rng.normal(scale=0.8, size=10 if actor == 0 else 300)
        gender = "m" if actor == 0 else "f"
        joints_world = np.zeros((frames, 72))
        poses2d = np.zeros((frames, 3, 18))
        if body_model is not None:
            joints_world, poses2d = joint_labels(body_model, poses, betas[:10], trans,
                                                 "male" if gender == "m" else "female",
                                                 cam_poses, K)
            if actor == UNDETECTED[0]:
                poses2d[UNDETECTED[1], 2, UNDETECTED[2]] = 0.0
        data["genders"].append(gender)
        data["poses"].append(poses)
        data["betas"].append(betas)
        data["trans"].append(trans)
        data["campose_valid"].append(np.asarray(valid[actor], dtype=np.float64))
        data["poses2d"].append(poses2d)
        data["jointPositions"].append(joints_world)
    return data


def make_3dpw_release(root, body_model=None, split: str = "test", seed: int = 0) -> dict:
    """Write the fake release under ``root``; returns what a converter should produce.

    -> {"root", "files", "sequences" (name -> data dict), "valid_keys" (sample keys
    ``3dpw/<sequence>/<frame>/<actor>`` of the valid actor-frames), "num_valid"}
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    files, sequences, keys = [], {}, []
    for name, valid in SEQUENCES:
        data = _sequence(name, valid, rng, body_model)
        path = root / "sequenceFiles" / split / f"{name}.pkl"
        write_sequence_file(path, data)
        files.append(path)
        sequences[name] = data
        image_dir = root / "imageFiles" / name
        image_dir.mkdir(parents=True, exist_ok=True)
        for frame in range(len(valid[0])):
            write_jpeg(image_dir / f"image_{frame:05d}.jpg", _image(rng), quality=85)
        keys += [f"3dpw/{name}/{frame:05d}/{actor}" for actor, flags in enumerate(valid)
                 for frame, flag in enumerate(flags) if flag]
    return {"root": root, "files": files, "sequences": sequences, "valid_keys": keys,
            "num_valid": len(keys)}
