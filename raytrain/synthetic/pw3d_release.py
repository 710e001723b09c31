"""A synthetic 3DPW release: rendered people in the raw 3DPW on-disk format.

    write_synthetic_3dpw("data/3DPW-synthetic", split="test", sequences=3, frames=8)
    python -m raytrain.synthetic.pw3d_release --root data/3DPW-synthetic --split test
    python datasets/shard_3dpw.py --root data/3DPW-synthetic --split test --out shards/3dpw-test

Writes ``sequenceFiles/<split>/<sequence>.pkl`` (dicts pickled with protocol 2, as the
python-2 release files, see ``raytrain.data.convert.pw3d``) and
``imageFiles/<sequence>/image_XXXXX.jpg``. The images are the people of the pickles,
rendered by the synthetic renderer (``raytrain.synthetic.people``: per-part colours,
Lambertian shading, procedural textured background) through the stored camera: the
gendered SMPL-format body of ``poses``/``betas``/``trans`` (world frame) moved by
``cam_poses`` (world -> camera) and projected through ``cam_intrinsics`` (fx = fy,
principal point at the image centre; portrait frames like 3DPW's 1080 x 1920).

A sequence is smooth: per actor the body pose blends slowly between key poses, the
person turns slowly and drifts across the frame, and the camera pans and moves a little.
The world frame is gravity-aligned (y up) with a random heading and origin, so the
extrinsics are far from the identity and change from frame to frame. Actors are 'm' or
'f' with (10,) betas; some actor-frames have ``campose_valid`` 0 (a contiguous stretch,
as in the release). ``poses2d`` is OpenPose-18 of the projected J24 joints (confidence
0.9 in the image, 0 outside) and ``jointPositions`` the world-frame SMPL joints.

In the camera frame the people follow the synthetic training distribution of a
``SyntheticConfig`` (``pose_cfg``): its heading range (around facing the camera), pitch
/roll (``tilt_scale``), joint-angle scale (``pose_scale``), shape spread, focal range
(multiple of the image diagonal), box size and centre ranges. So a model trained on
``raytrain shard synthetic`` data with the same config can be evaluated meaningfully on
the converted set. Everything is a function of ``seed``.
"""

from __future__ import annotations

import argparse
import logging
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np
import torch
from scipy.spatial.transform import Rotation, Slerp

from ..body.joints import J24_TO_OPENPOSE18
from .people import Body, SyntheticConfig, body_from_model, render_person, sample_background, sample_body_pose

log = logging.getLogger(__name__)

DETECTION_CONFIDENCE = 0.9
GENDER_NAMES = {"m": "male", "f": "female"}
#: A key pose every this many frames (the body pose blends between them).
KEY_POSE_EVERY = 30
#: Largest heading change over a sequence (radians per frame, times frames).
TURN_PER_FRAME = 0.04
#: Largest drift speeds of a person in the camera frame (metres per frame): sideways / depth.
DRIFT_SPEED = (0.015, 0.02)
#: Largest total drift over a sequence: box centre (fraction of min(W, H)) / depth (fraction).
DRIFT_TOTAL = (0.12, 0.15)

PoseSampler = Callable[[np.random.Generator], np.ndarray]


# ----------------------------------------------------------------------------- files


def write_sequence_file(path, data: dict) -> None:
    """Pickle a sequence dict the way the release does (protocol 2)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        pickle.dump(data, handle, protocol=2)


def write_jpeg(path, image_rgb: np.ndarray, quality: int = 90) -> None:
    """(H, W, 3) uint8 RGB -> a JPEG file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR),
                            [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError(f"{path}: JPEG encoding failed")
    path.write_bytes(data.tobytes())


def intrinsics_matrix(fx: float, fy: float, image_size) -> np.ndarray:
    """K (3, 3) with the principal point at the centre of ``image_size`` (W, H)."""
    return np.array([[fx, 0.0, image_size[0] / 2], [0.0, fy, image_size[1] / 2], [0.0, 0.0, 1.0]])


# ----------------------------------------------------------------------------- geometry


def world_from_camera(pose_cam: np.ndarray, trans_cam: np.ndarray, extrinsics: np.ndarray,
                      root_joint: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Camera-frame SMPL (pose (n, 72), translation (n, 3)) -> world frame (pose, trans).

    The inverse of ``raytrain.data.convert.pw3d.camera_frame_smpl``: with ``R_c, t_c``
    the extrinsics (n, 4, 4) world -> camera and ``J0`` the rest root joint (3,),
    ``R_w = R_c^T R_cam`` and ``trans = R_c^T (trans_cam + J0 - t_c) - J0``.
    """
    rot_c = extrinsics[:, :3, :3]
    t_c = extrinsics[:, :3, 3]
    rot_w = np.transpose(rot_c, (0, 2, 1)) @ Rotation.from_rotvec(pose_cam[:, :3]).as_matrix()
    pose_world = np.array(pose_cam, dtype=np.float64, copy=True)
    pose_world[:, :3] = Rotation.from_matrix(rot_w).as_rotvec()
    trans = np.einsum("nji,nj->ni", rot_c, trans_cam + root_joint - t_c) - root_joint
    return pose_world, trans


def project_points(points_cam: np.ndarray, K: np.ndarray) -> np.ndarray:
    """Camera-frame points (..., 3) -> pixels (..., 2) through the full K."""
    uvw = points_cam @ K.T
    return uvw[..., :2] / uvw[..., 2:]


def openpose18(pixels_j24: np.ndarray, image_size=None,
               confidence: float = DETECTION_CONFIDENCE) -> np.ndarray:
    """Projected J24 joints (F, 24, 2) -> OpenPose-18 detections (F, 3, 18).

    Confidence ``confidence`` for each joint (0 outside the image when ``image_size``
    (W, H) is given).
    """
    frames = pixels_j24.shape[0]
    poses2d = np.zeros((frames, 3, 18))
    for j24, op18 in J24_TO_OPENPOSE18.items():
        xy = pixels_j24[:, j24]
        poses2d[:, :2, op18] = xy
        seen = np.ones(frames, bool)
        if image_size is not None:
            seen = ((xy[:, 0] >= 0) & (xy[:, 0] < image_size[0])
                    & (xy[:, 1] >= 0) & (xy[:, 1] < image_size[1]))
        poses2d[:, 2, op18] = confidence * seen
    return poses2d


@torch.no_grad()
def joint_labels(body_model, poses: np.ndarray, betas: np.ndarray, trans: np.ndarray,
                 gender: str, cam_poses: np.ndarray, K: np.ndarray, image_size=None):
    """World SMPL joints (F, 72) (``jointPositions``) and OpenPose-18 (F, 3, 18) of one actor.

    poses (F, 72) and trans (F, 3) world frame, betas (10,), gender 'male'/'female',
    cam_poses (F, 4, 4) world -> camera, K (3, 3).
    """
    frames = poses.shape[0]
    out = body_model.forward_axis_angle(torch.as_tensor(poses, dtype=torch.float32),
                                        torch.as_tensor(np.tile(betas, (frames, 1)),
                                                        dtype=torch.float32), gender)
    joints_world = out.joints_smpl.double().numpy() + trans[:, None]
    j24_world = out.joints_j24.double().numpy() + trans[:, None]
    j24_cam = np.einsum("nij,nkj->nki", cam_poses[:, :3, :3], j24_world) + cam_poses[:, None, :3, 3]
    poses2d = openpose18(project_points(j24_cam, K), image_size)
    return joints_world.reshape(frames, 72), poses2d


# ----------------------------------------------------------------------------- sampling


@dataclass
class ActorPlan:
    """One actor of a sequence, in the camera frame of each frame."""

    gender: str  # 'm' / 'f'
    betas: np.ndarray  # (10,)
    pose_cam: np.ndarray  # (F, 72) root orientation in the camera frame
    box_fraction: float  # wanted box side / min(W, H) in the first frame
    centre: np.ndarray  # (2,) wanted box centre in the first frame, fractions of W, H
    drift: np.ndarray  # (3,) velocity in the camera frame, metres per frame (capped in total)
    valid: np.ndarray  # (F,) campose_valid


@dataclass
class SequencePlan:
    """Everything random about one sequence (plain numpy)."""

    name: str
    focal: float
    extrinsics: np.ndarray  # (F, 4, 4) world -> camera
    light: np.ndarray  # (3,)
    part_gain: np.ndarray  # (24,)
    background: dict
    actors: list


def sequence_background(seed: int, index: int, image_size) -> dict:
    """Background texture parameters of sequence ``index`` (its own random stream)."""
    return sample_background(np.random.default_rng([seed, index, 1]), tuple(image_size))


def _smooth(frames: int) -> np.ndarray:
    """Blend weights 0 -> 1 over the frames (smoothstep, zero velocity at the ends)."""
    s = np.linspace(0.0, 1.0, frames) if frames > 1 else np.zeros(1)
    return s * s * (3 - 2 * s)


def _body_pose_track(rng, frames: int, sampler: PoseSampler) -> np.ndarray:
    """(F, 69): body pose slerped per joint between key poses ``sampler(rng)``."""
    keys = max(2, 1 + int(np.ceil((frames - 1) / KEY_POSE_EVERY)))
    key_poses = np.stack([np.asarray(sampler(rng), np.float64).reshape(69) for _ in range(keys)])
    key_times = np.arange(keys) * KEY_POSE_EVERY
    # Random phase: the sequence starts somewhere between the first two key poses.
    times = rng.uniform(0, KEY_POSE_EVERY / 2) + np.arange(frames)
    track = np.empty((frames, 23, 3))
    for joint in range(23):
        rotations = Rotation.from_rotvec(key_poses[:, 3 * joint:3 * joint + 3])
        track[:, joint] = Slerp(key_times, rotations)(np.minimum(times, key_times[-1])).as_rotvec()
    return track.reshape(frames, 69)


def _orient_track(rng, frames: int, cfg: SyntheticConfig) -> np.ndarray:
    """(F, 3) root orientation in the camera frame: upright, turning slowly.

    As ``synthetic.sample_global_orient``: heading within ``cfg.heading_range`` of
    facing the camera, a little pitch/roll (``cfg.tilt_scale``).
    """
    heading_range = float(getattr(cfg, "heading_range", np.pi))
    tilt_scale = float(getattr(cfg, "tilt_scale", 1.0))
    start = rng.uniform(-heading_range, heading_range)
    turn = TURN_PER_FRAME * max(frames - 1, 1)
    end = np.clip(start + rng.uniform(-turn, turn), -heading_range, heading_range)
    heading = start + (end - start) * _smooth(frames)
    tilt0, tilt1 = (np.clip(rng.normal(0, [0.15 * tilt_scale, 0.1 * tilt_scale]), -0.4, 0.4)
                    for _ in range(2))
    tilt = tilt0 + (tilt1 - tilt0) * 0.3 * _smooth(frames)[:, None]
    upright = Rotation.from_euler("x", np.pi)
    return (Rotation.from_euler("xz", tilt) * Rotation.from_euler("y", heading[:, None]) * upright).as_rotvec()


def _camera_track(rng, frames: int) -> np.ndarray:
    """(F, 4, 4) world -> camera of a camera at eye height that pans and moves slowly.

    World: y up (gravity -y), random heading and origin. Camera: x right, y down, z
    forward, a few degrees of pitch and roll.
    """
    s = _smooth(frames)
    yaw = rng.uniform(-np.pi, np.pi) + rng.uniform(-0.08, 0.08) * s
    pitch = rng.uniform(-0.15, 0.05) + rng.uniform(-0.03, 0.03) * s
    roll = rng.normal(0, 0.03) + rng.uniform(-0.02, 0.02) * s
    # Camera axes in the world for yaw = pitch = roll = 0: x -> world x, y -> world -y,
    # z -> world -z (looking along -z); then yaw about world y, pitch/roll about its own axes.
    base = np.diag([1.0, -1.0, -1.0])
    cam_to_world = (Rotation.from_euler("y", yaw[:, None]).as_matrix() @ base
                    @ Rotation.from_euler("xz", np.stack([pitch, roll], 1)).as_matrix())
    centre = (rng.uniform(-5, 5, 3) * [1, 0, 1] + [0, rng.uniform(1.2, 1.8), 0]
              + rng.normal(0, 0.3, 3) * s[:, None])  # (F, 3) camera centre in the world
    extrinsics = np.tile(np.eye(4), (frames, 1, 1))
    extrinsics[:, :3, :3] = np.transpose(cam_to_world, (0, 2, 1))
    extrinsics[:, :3, 3] = -np.einsum("nij,nj->ni", extrinsics[:, :3, :3], centre)
    return extrinsics


def _valid_track(rng, frames: int) -> np.ndarray:
    """(F,) campose_valid: all 1 but, half the time, one short stretch of 0."""
    valid = np.ones(frames)
    if frames > 1 and rng.random() < 0.5:
        length = int(rng.integers(1, max(1, frames // 4) + 1))
        first = int(rng.integers(0, frames - length + 1))
        valid[first:first + length] = 0
    return valid


def plan_sequence(seed: int, index: int, frames: int, actors: int, image_size,
                  cfg: SyntheticConfig, pose_sampler: PoseSampler | None = None,
                  name: str | None = None) -> SequencePlan:
    """Draw sequence ``index`` (a function of ``(seed, index)``)."""
    rng = np.random.default_rng([seed, index, 0])
    w, h = image_size
    pose_scale = float(getattr(cfg, "pose_scale", 1.0))
    sampler = pose_sampler or (lambda r: sample_body_pose(r, pose_scale))
    focal = float(np.hypot(w, h) * rng.uniform(*cfg.focal_range))
    light = np.array([rng.uniform(-0.6, 0.6), rng.uniform(-0.8, -0.1), -1.0])
    plan = SequencePlan(name=name or f"synthetic_{index:02d}", focal=focal,
                        extrinsics=_camera_track(rng, frames), light=light / np.linalg.norm(light),
                        part_gain=rng.uniform(0.85, 1.15, 24),
                        background=sequence_background(seed, index, image_size), actors=[])
    low, high = cfg.centre_range
    for actor in range(actors):
        # Side by side: actor k's box centre in the k-th slot of the centre range.
        slot = (low + (high - low) * actor / actors, low + (high - low) * (actor + 1) / actors)
        centre = np.array([rng.uniform(*slot), rng.uniform(low, high)])
        fraction = float(rng.uniform(*cfg.box_fraction))
        if actors > 1:  # keep several people from covering each other entirely
            fraction *= max(0.5, 1.0 / actors ** 0.5)
        direction = rng.uniform(0, 2 * np.pi)
        speed = rng.uniform(0, DRIFT_SPEED[0])
        drift = np.array([speed * np.cos(direction), speed * np.sin(direction),
                          rng.uniform(-DRIFT_SPEED[1], DRIFT_SPEED[1])])
        pose_cam = np.concatenate([_orient_track(rng, frames, cfg),
                                   _body_pose_track(rng, frames, sampler)], axis=1)
        plan.actors.append(ActorPlan(
            gender="m" if rng.random() < 0.5 else "f",
            betas=np.clip(rng.normal(0, cfg.betas_std, 10), -2.5, 2.5),
            pose_cam=pose_cam, box_fraction=fraction, centre=centre, drift=drift,
            valid=_valid_track(rng, frames)))
    return plan


def _placement(vertices: np.ndarray, focal: float, image_size, fraction: float,
               centre: np.ndarray, padding: float) -> np.ndarray:
    """Camera translation (3,) putting posed vertices (V, 3) at a box size and centre.

    As ``synthetic.place_person``.
    """
    w, h = image_size
    lo, hi = vertices.min(axis=0), vertices.max(axis=0)
    extent = max(hi[0] - lo[0], hi[1] - lo[1])
    tz = max(focal * extent * padding / (fraction * min(w, h)) - (lo[2] + hi[2]) / 2,
             1.0 + (hi[2] - lo[2]))
    target = (centre * np.array([w, h]) - np.array([w, h]) / 2) * tz / focal
    return np.array([target[0] - (lo[0] + hi[0]) / 2, target[1] - (lo[1] + hi[1]) / 2, tz])


# ----------------------------------------------------------------------------- writer


@torch.no_grad()
def _pose_actor(body_model, actor: ActorPlan, plan: SequencePlan, image_size,
                cfg: SyntheticConfig):
    """Posed camera-frame vertices (F, V, 3), camera translation (F, 3), J0 (3,)."""
    frames = actor.pose_cam.shape[0]
    gender = GENDER_NAMES[actor.gender]
    betas = torch.as_tensor(np.tile(actor.betas, (frames, 1)), dtype=torch.float32)
    out = body_model.forward_axis_angle(torch.as_tensor(actor.pose_cam, dtype=torch.float32),
                                        betas, gender)
    rest = body_model.forward_axis_angle(torch.zeros(1, 72), betas[:1], gender)
    vertices = out.vertices.double().numpy()
    first = _placement(vertices[0], plan.focal, image_size, actor.box_fraction, actor.centre,
                       cfg.box_padding)
    # Drift at the actor's speed, capped so that the person stays about where placed.
    total = actor.drift * max(frames - 1, 0)
    lateral_cap = DRIFT_TOTAL[0] * min(image_size) * first[2] / plan.focal
    total[:2] *= min(1.0, lateral_cap / max(np.linalg.norm(total[:2]), 1e-12))
    total[2] = np.clip(total[2], -DRIFT_TOTAL[1] * first[2], DRIFT_TOTAL[1] * first[2])
    trans_cam = first + total * np.linspace(0.0, 1.0, frames)[:, None]
    return vertices + trans_cam[:, None], trans_cam, rest.joints_smpl[0, 0].double().numpy()


def _combined_body(body: Body, count: int, num_vertices: int) -> Body:
    """The renderer's mesh of ``count`` people (vertices concatenated)."""
    faces = np.concatenate([body.faces + k * num_vertices for k in range(count)])
    return Body(faces, np.tile(body.parts, count), body.orientation)


def write_synthetic_3dpw(root, split: str = "test", sequences: int = 3, frames: int = 8,
                         actors: int = 1, seed: int = 0, image_size=(540, 960), smpl_dir=None,
                         pose_cfg: SyntheticConfig | None = None,
                         pose_sampler: PoseSampler | None = None, body_model=None,
                         progress: bool = False) -> dict:
    """Write a rendered 3DPW-format release under ``root``.

    image_size: (W, H) of every frame (default portrait 540 x 960, 3DPW's 1080 x 1920
    halved). pose_cfg: the ``SyntheticConfig`` whose distribution the people follow in
    the camera frame (default: the default config); pose_sampler: ``rng -> (69,)`` body
    pose of the key poses (default ``sample_body_pose(rng, pose_cfg.pose_scale)``).
    body_model: a ``BodyModel`` with 'male' and 'female' (default
    ``load_body_model(smpl_dir, ("male", "female"))``).

    -> {"root", "split", "sequences" (names), "valid_samples" (valid actor-frames = the
    samples ``datasets/shard_3dpw.py`` will write)}
    """
    if sequences < 1 or frames < 1 or actors < 1:
        raise ValueError("sequences, frames and actors must be >= 1")
    root = Path(root)
    image_size = (int(image_size[0]), int(image_size[1]))
    cfg = pose_cfg or SyntheticConfig()
    if body_model is None:
        from raytrain.body import load_body_model

        from .body_model import default_body_model_dir

        body_model = load_body_model(smpl_dir or default_body_model_dir(), genders=("male", "female"))
    body = body_from_model(body_model)
    names, valid_samples = [], 0
    for index in range(sequences):
        plan = plan_sequence(seed, index, frames, actors, image_size, cfg, pose_sampler)
        if index == 0 and frames > 1 and all(a.valid.all() for a in plan.actors):
            plan.actors[0].valid[frames // 2] = 0  # at least one campose_valid zero
        data = _write_sequence(root, split, plan, body_model, body, image_size, cfg)
        names.append(plan.name)
        valid_samples += int(sum(v.sum() for v in data["campose_valid"]))
        if progress:
            log.info("  %s: %d frames, %d actor(s)", plan.name, frames, actors)
    return {"root": str(root), "split": split, "sequences": names, "valid_samples": valid_samples}


def _write_sequence(root: Path, split: str, plan: SequencePlan, body_model, body: Body,
                    image_size, cfg: SyntheticConfig) -> dict:
    frames = plan.extrinsics.shape[0]
    K = intrinsics_matrix(plan.focal, plan.focal, image_size)
    data = {"sequence": plan.name, "genders": [], "poses": [], "betas": [], "trans": [],
            "campose_valid": [], "poses2d": [], "jointPositions": [],
            "cam_poses": plan.extrinsics, "cam_intrinsics": K,
            "img_frame_ids": np.arange(frames)}
    meshes = []
    for actor in plan.actors:
        vertices_cam, trans_cam, root_joint = _pose_actor(body_model, actor, plan, image_size, cfg)
        meshes.append(vertices_cam)
        poses, trans = world_from_camera(actor.pose_cam, trans_cam, plan.extrinsics, root_joint)
        joints_world, poses2d = joint_labels(body_model, poses, actor.betas, trans,
                                             GENDER_NAMES[actor.gender], plan.extrinsics, K,
                                             image_size)
        data["genders"].append(actor.gender)
        data["poses"].append(poses)
        data["betas"].append(actor.betas.copy())
        data["trans"].append(trans)
        data["campose_valid"].append(actor.valid.astype(np.float64))
        data["poses2d"].append(poses2d)
        data["jointPositions"].append(joints_world)
    write_sequence_file(root / "sequenceFiles" / split / f"{plan.name}.pkl", data)
    scene = _combined_body(body, len(meshes), meshes[0].shape[1])
    for frame in range(frames):
        vertices = np.concatenate([mesh[frame] for mesh in meshes])
        image = render_person(vertices, scene, plan.focal, image_size, plan.light,
                              plan.background, plan.part_gain)
        write_jpeg(root / "imageFiles" / plan.name / f"image_{frame:05d}.jpg", image,
                   cfg.jpeg_quality)
    return data


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m raytrain.synthetic.pw3d_release",
        description="Write a synthetic 3DPW release (rendered people, the raw on-disk "
                    "format) for datasets/shard_3dpw.py.")
    parser.add_argument("--root", required=True, help="output release root")
    parser.add_argument("--split", choices=("train", "validation", "test"), default="test")
    parser.add_argument("--sequences", type=int, default=3)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--actors", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, nargs=2, default=(540, 960),
                        metavar=("W", "H"))
    parser.add_argument("--smpl-dir", default=None,
                        help="SMPL files (default: the synthetic body model)")
    parser.add_argument("--heading-range", type=float, default=None,
                        help="heading within +-x rad of facing the camera (SyntheticConfig)")
    parser.add_argument("--tilt-scale", type=float, default=None)
    parser.add_argument("--pose-scale", type=float, default=None,
                        help="joint angles within x times the limits (SyntheticConfig)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    knobs = {"heading_range": args.heading_range, "tilt_scale": args.tilt_scale,
             "pose_scale": args.pose_scale}
    cfg = replace(SyntheticConfig(), **{k: v for k, v in knobs.items() if v is not None})
    info = write_synthetic_3dpw(args.root, args.split, args.sequences, args.frames, args.actors,
                                args.seed, tuple(args.image_size), args.smpl_dir, cfg,
                                progress=True)
    print(f"wrote {len(info['sequences'])} sequences, {info['valid_samples']} valid actor-frames "
          f"under {info['root']} (split {info['split']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
