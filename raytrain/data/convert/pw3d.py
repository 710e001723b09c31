"""The raw 3DPW release -> schema-v1 shards, ground truth in the camera frame.

Layout (https://virtualhumans.mpi-inf.mpg.de/3DPW/):

    <root>/sequenceFiles/{train,validation,test}/<sequence>.pkl
    <root>/imageFiles/<sequence>/image_00000.jpg ...

Each sequence file is a python-2 pickle, read with raytrain's restricted unpickler
(``raytrain.safe_pickle``: numpy arrays, lists, strings and numbers, nothing else; a file
naming any other global is refused, naming the file) holding
``sequence``, ``genders`` ('m'/'f' per actor), ``poses`` (per actor (F, 72) world-frame
SMPL), ``betas`` (per actor (10,) or (300,)), ``trans`` (per actor (F, 3)), ``cam_poses``
((F, 4, 4) world -> camera), ``cam_intrinsics`` ((3, 3)), ``campose_valid`` (per actor
(F,)), ``poses2d`` (per actor (F, 3, 18) OpenPose-18), ``img_frame_ids``, ``jointPositions``.
Frame ``i`` of ``poses`` is ``image_{i:05d}.jpg`` (the poses are aligned with the images;
``img_frame_ids`` maps the 60 Hz streams, which are not used).

One sample per actor and frame with ``campose_valid`` = 1. With ``R_c, t_c`` the
extrinsics and ``J0(beta)`` the SMPL rest root joint (SMPL rotates about it, so it is
not at the origin), the world model ``R_w (X - J0) + J0 + trans`` becomes in the camera
frame ``(R_c R_w)(X - J0) + J0 + trans_cam`` with

    trans_cam = R_c (J0 + trans) + t_c - J0          (stored as cam_full)

``joints_3d`` are the J24 joints of the camera-frame gendered mesh (metres);
``keypoints_2d`` their projection through ``cam_intrinsics`` (the full K, principal point
included), confidence 0 outside the image and, with ``visibility="poses2d"``, for joints
the actor's OpenPose detection of that frame misses; the box is the projected mesh's
bounding square x 1.2; ``focal`` the mean of fx, fy. The project assumes the principal
point at the image centre: each sample's json records ``principal_point`` and
``focal_xy`` so a consumer can check (the 3DPW release has it at the centre).
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path

import numpy as np
import torch

from raytrain.body.joints import J24_TO_OPENPOSE18
from raytrain.geometry import axis_angle_to_rotmat, rotmat_to_axis_angle
from raytrain.safe_pickle import UnsafePickleError, safe_load

from .common import ConversionSummary, Record, RecordSet, StorageConfig, convert_record_set, label_text, make_key

SOURCE = "3dpw"
PW3D_LICENCE = ("3DPW: non-commercial scientific research only (3DPW licence, "
                "https://virtualhumans.mpi-inf.mpg.de/3DPW/license.html); "
                "SMPL model licence for the meshes")
SPLITS = ("train", "validation", "test")
REQUIRED_KEYS = ("sequence", "genders", "poses", "betas", "trans", "cam_poses",
                 "cam_intrinsics", "campose_valid")
USED_KEYS = frozenset({*REQUIRED_KEYS, "poses2d"})  # any other key is reported as ignored
BOX_SCALE = 1.2

_GENDERS = {"m": "male", "male": "male", "f": "female", "female": "female"}


class SequenceFileError(ValueError):
    """A 3DPW sequence file that cannot be used (the message names the file)."""


# ----------------------------------------------------------------------------- files


def sequence_files(root: str | os.PathLike, split: str) -> list[Path]:
    """The sorted ``sequenceFiles/<split>/*.pkl`` of a 3DPW release."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    folder = Path(root) / "sequenceFiles" / split
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not found (expected the 3DPW release layout "
                                f"<root>/sequenceFiles/{{{','.join(SPLITS)}}}/*.pkl)")
    files = sorted(folder.glob("*.pkl"))
    if not files:
        raise FileNotFoundError(f"{folder}: no .pkl sequence files")
    return files


def load_sequence_file(path: str | os.PathLike) -> dict:
    """Unpickle (latin1) and check one sequence file -> dict of numpy arrays.

    Raises ``SequenceFileError`` naming the file and, for an incomplete file, the
    missing keys.
    """
    path = Path(path)
    try:
        data = safe_load(path)
    except FileNotFoundError:
        raise
    except UnsafePickleError as error:
        raise SequenceFileError(str(error)) from None
    except Exception as error:  # noqa: BLE001 - any unpickling failure is a bad file
        raise SequenceFileError(f"{path}: not a readable 3DPW sequence pickle "
                                f"({type(error).__name__}: {error})") from None
    if not isinstance(data, dict):
        raise SequenceFileError(f"{path}: holds a {type(data).__name__}, expected the dict "
                                "of a 3DPW sequence file")
    missing = [key for key in REQUIRED_KEYS if key not in data]
    if missing:
        raise SequenceFileError(f"{path}: missing keys {missing} (a 3DPW sequence file has "
                                f"{list(REQUIRED_KEYS)})")
    try:
        normalised = _normalise(data)
    except (ValueError, TypeError, IndexError) as error:
        raise SequenceFileError(f"{path}: {error}") from None
    normalised["ignored_keys"] = sorted(str(key) for key in set(data) - USED_KEYS)
    return normalised


def _normalise(data: dict) -> dict:
    poses = [np.asarray(p, dtype=np.float64) for p in data["poses"]]
    actors = len(poses)
    if actors == 0:
        raise ValueError("no actors in 'poses'")
    frames = poses[0].shape[0]
    out = {
        "sequence": label_text(data["sequence"], "latin1"),
        "genders": [label_text(g, "latin1") for g in data["genders"]],
        "poses": poses,
        "betas": [np.asarray(b, dtype=np.float64).reshape(-1) for b in data["betas"]],
        "trans": [np.asarray(t, dtype=np.float64) for t in data["trans"]],
        "cam_poses": np.asarray(data["cam_poses"], dtype=np.float64),
        "cam_intrinsics": np.asarray(data["cam_intrinsics"], dtype=np.float64),
        "campose_valid": [np.asarray(v).reshape(-1).astype(bool) for v in data["campose_valid"]],
        "poses2d": ([np.asarray(p, dtype=np.float64) for p in data["poses2d"]]
                    if data.get("poses2d") is not None else None),
        "num_frames": frames,
    }
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", out["sequence"]) or ".." in out["sequence"]:
        raise ValueError(f"'sequence' {out['sequence'][:100]!r} is not a plain folder name under "
                         "imageFiles/")
    for key in ("genders", "betas", "trans", "campose_valid"):
        if len(out[key]) != actors:
            raise ValueError(f"'{key}' has {len(out[key])} actors, 'poses' has {actors}")
    for actor in range(actors):
        checks = {"poses": (out["poses"][actor].shape, (frames, 72)),
                  "trans": (out["trans"][actor].shape, (frames, 3)),
                  "campose_valid": (out["campose_valid"][actor].shape, (frames,))}
        if out["poses2d"] is not None:
            checks["poses2d"] = (out["poses2d"][actor].shape, (frames, 3, 18))
        for key, (shape, want) in checks.items():
            if shape != want:
                raise ValueError(f"'{key}' of actor {actor} has shape {shape}, expected {want}")
        if out["betas"][actor].size < 10:
            raise ValueError(f"'betas' of actor {actor} has {out['betas'][actor].size} values, "
                             "expected at least 10")
        if out["genders"][actor].lower() not in _GENDERS:
            raise ValueError(f"gender {out['genders'][actor]!r} of actor {actor} is not 'm'/'f'")
    if out["cam_poses"].shape != (frames, 4, 4):
        raise ValueError(f"'cam_poses' has shape {out['cam_poses'].shape}, expected ({frames}, 4, 4)")
    if out["cam_intrinsics"].shape != (3, 3):
        raise ValueError(f"'cam_intrinsics' has shape {out['cam_intrinsics'].shape}, expected (3, 3)")
    return out


def scan_split(root: str | os.PathLike, split: str) -> tuple[list[Path], int, list[str]]:
    """Check every sequence file of the split up front;
    -> (files, valid actor-frames, the keys of the files no record uses)."""
    files = sequence_files(root, split)
    total, ignored = 0, set()
    for path in files:
        seq = load_sequence_file(path)
        total += int(sum(v.sum() for v in seq["campose_valid"]))
        ignored.update(seq["ignored_keys"])
    return files, total, sorted(ignored)


# ----------------------------------------------------------------------------- geometry


def camera_frame_smpl(pose_world: np.ndarray, trans_world: np.ndarray, extrinsics: np.ndarray,
                      root_joint: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """World-frame SMPL (pose (n, 72), trans (n, 3)) -> camera frame (pose, translation).

    extrinsics (n, 4, 4) world -> camera; root_joint (3,) the rest root joint J0(beta).
    """
    rot_c = extrinsics[:, :3, :3]
    t_c = extrinsics[:, :3, 3]
    rot_w = axis_angle_to_rotmat(torch.as_tensor(pose_world[:, :3], dtype=torch.float64)).numpy()
    orient = rotmat_to_axis_angle(torch.as_tensor(rot_c @ rot_w)).numpy()
    pose_cam = pose_world.copy()
    pose_cam[:, :3] = orient
    trans_cam = np.einsum("nij,nj->ni", rot_c, root_joint + trans_world) + t_c - root_joint
    return pose_cam, trans_cam


def project(points: np.ndarray, intrinsics: np.ndarray) -> np.ndarray:
    """Camera-frame points (..., 3) -> pixels (..., 2) through the full K."""
    z = points[..., 2:3]
    uvw = points @ intrinsics.T
    return uvw[..., :2] / np.where(np.abs(z) < 1e-9, 1e-9, z)


def _visibility_from_poses2d(poses2d: np.ndarray) -> np.ndarray:
    """(3, 18) OpenPose detection -> (24,) multiplier: 0 where a detected person misses a joint."""
    keep = np.ones(24)
    confidence = poses2d[2]
    if not np.any(confidence > 0):  # no detection for this actor: no information
        return keep
    for j24, op18 in J24_TO_OPENPOSE18.items():
        if confidence[op18] <= 0:
            keep[j24] = 0.0
    return keep


# ----------------------------------------------------------------------------- records


def pw3d_records(files: Sequence[str | os.PathLike], root: str | os.PathLike, body_model,
                 visibility: str = "poses2d", chunk: int = 256) -> Iterator[Record]:
    """One ``Record`` per actor and valid frame of the given sequence files.

    body_model: a ``raytrain.body.BodyModel`` with the 'male' and 'female' genders.
    """
    if visibility not in ("poses2d", "projection"):
        raise ValueError(f"visibility must be 'poses2d' or 'projection', got {visibility!r}")
    for path in files:
        seq = load_sequence_file(path)
        for actor in range(len(seq["poses"])):
            frames = np.flatnonzero(seq["campose_valid"][actor])
            for first in range(0, len(frames), chunk):
                yield from _actor_records(seq, actor, frames[first:first + chunk], root,
                                          body_model, visibility)


@torch.no_grad()
def _actor_records(seq: dict, actor: int, frames: np.ndarray, root, body_model,
                   visibility: str) -> Iterator[Record]:
    name = seq["sequence"]
    gender = _GENDERS[seq["genders"][actor].lower()]
    betas = seq["betas"][actor][:10]
    n = len(frames)
    dtype = torch.float32
    betas_t = torch.as_tensor(np.tile(betas, (n, 1)), dtype=dtype)
    rest = body_model.forward_axis_angle(torch.zeros(1, 72, dtype=dtype), betas_t[:1], gender)
    root_joint = rest.joints_smpl[0, 0].double().numpy()
    pose_cam, trans_cam = camera_frame_smpl(seq["poses"][actor][frames], seq["trans"][actor][frames],
                                            seq["cam_poses"][frames], root_joint)
    out = body_model.forward_axis_angle(torch.as_tensor(pose_cam, dtype=dtype), betas_t, gender)
    vertices = out.vertices.double().numpy() + trans_cam[:, None]
    joints = out.joints_j24.double().numpy() + trans_cam[:, None]
    K = seq["cam_intrinsics"]
    keypoints = project(joints, K)
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    for i, frame in enumerate(frames):
        frame = int(frame)
        key = make_key(SOURCE, name, f"{frame:05d}", actor)
        image_path = os.path.join(os.fspath(root), "imageFiles", name, f"image_{frame:05d}.jpg")
        front = vertices[i, :, 2] > 1e-3
        if joints[i, 14, 2] <= 1e-3 or not front.any():
            yield Record(key, image_path, skip="behind_camera",
                         detail=f"{key}: pelvis depth {joints[i, 14, 2]:.3f} m")
            continue
        pixels = project(vertices[i, front], K)
        low, high = pixels.min(axis=0), pixels.max(axis=0)
        centre = (low + high) / 2
        side = BOX_SCALE * float((high - low).max())
        confidence = (joints[i, :, 2] > 1e-3).astype(np.float64)
        if visibility == "poses2d" and seq["poses2d"] is not None:
            confidence *= _visibility_from_poses2d(seq["poses2d"][actor][frame])
        labels = {
            "box": [centre[0], centre[1], side],
            "keypoints_2d": np.concatenate([keypoints[i], confidence[:, None]], axis=1),
            "joints_3d": np.concatenate([joints[i], np.ones((24, 1))], axis=1),
            "pose": pose_cam[i],
            "betas": betas,
            "has_smpl": True,
            "gender": gender,
            "focal": float((fx + fy) / 2),
            "cam_full": trans_cam[i],
            "mask_outside": True,
            "meta": {"sequence": name, "frame": frame, "actor": actor,
                     "principal_point": [float(cx), float(cy)],
                     "focal_xy": [float(fx), float(fy)]},
        }
        yield Record(key, image_path, labels)


# ----------------------------------------------------------------------------- driver


def _records_from_release(files: list[str], root: str, smpl_dir, body_model,
                          visibility: str) -> Iterator[Record]:
    """The records of a release's sequence files (a ``RecordSet`` factory: picklable).

    The SMPL forward passes run on one thread: float sums do not depend on the thread
    count then, so a Ray task (one CPU) makes the bytes this process makes.
    """
    if body_model is None:
        from raytrain.body import load_body_model

        body_model = load_body_model(smpl_dir, genders=("male", "female"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield from pw3d_records(files, root, body_model, visibility=visibility)
    finally:
        torch.set_num_threads(threads)


def pw3d_record_set(root: str | os.PathLike, split: str, *, smpl_dir=None, body_model=None,
                    visibility: str = "poses2d") -> RecordSet:
    """The ``RecordSet`` of one split of the raw 3DPW release (every file checked now).

    ``body_model``: a ``BodyModel`` with 'male' and 'female' (default: loaded from
    ``smpl_dir`` where the records are made).
    """
    if visibility not in ("poses2d", "projection"):
        raise ValueError(f"visibility must be 'poses2d' or 'projection', got {visibility!r}")
    files, total, ignored = scan_split(root, split)
    if body_model is None:
        from raytrain.body import load_body_model

        load_body_model(smpl_dir, genders=("male", "female"))  # fail now, not in a worker
    factory = partial(_records_from_release, [os.fspath(f) for f in files], os.fspath(root),
                      None if smpl_dir is None else os.fspath(smpl_dir), body_model, visibility)
    return RecordSet(source=SOURCE, licence=PW3D_LICENCE, total=total, make_records=factory,
                     ignored_keys=ignored)


def convert_3dpw(root: str | os.PathLike, split: str, out: str, *, smpl_dir=None,
                 body_model=None, visibility: str = "poses2d", limit: int | None = None,
                 workers: int = 1, maxcount: int = 1000, storage: StorageConfig | None = None,
                 progress: bool = True, printer=print, overwrite: bool = False) -> ConversionSummary:
    """Convert one split of the raw 3DPW release into shards under ``out``.

    Every sequence file is checked before anything is written. ``body_model``: a
    ``BodyModel`` with 'male' and 'female' (default: ``load_body_model(smpl_dir)``).
    """
    record_set = pw3d_record_set(root, split, smpl_dir=smpl_dir, body_model=body_model,
                                 visibility=visibility)
    return convert_record_set(record_set, out, limit=limit, workers=workers, maxcount=maxcount,
                              storage=storage, progress=progress, printer=printer, overwrite=overwrite)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``raytrain shard 3dpw`` options: the raw release or a SPIN-style npz."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--root", help="3DPW release root (sequenceFiles/, imageFiles/)")
    source.add_argument("--npz", help="SPIN-style 3DPW label file (e.g. 3dpw_test.npz)")
    parser.add_argument("--split", choices=SPLITS, default="test")
    parser.add_argument("--img-root", help="with --npz: directory imgname is relative to "
                                           "(the 3DPW root)")
    parser.add_argument("--smpl-dir", default=None,
                        help="with --root: SMPL files (SMPL_{NEUTRAL,MALE,FEMALE}.pkl, "
                             "J_regressor_h36m.npy, smpl_mean_params.npz) to compute the joints")
    parser.add_argument("--visibility", choices=("poses2d", "projection"), default="poses2d",
                        help="2D confidence: projection in the image, and (poses2d) 0 where "
                             "the actor's OpenPose detection misses the joint")


def record_set_from_args(args: argparse.Namespace) -> RecordSet:
    if args.npz:
        if not args.img_root:
            raise ValueError("--npz needs --img-root")
        from .spin_npz import spin_npz_record_set

        return spin_npz_record_set(args.npz, args.img_root, SOURCE, licence=PW3D_LICENCE)
    if not args.smpl_dir:
        raise ValueError("--root needs --smpl-dir (the SMPL files the joints are computed with)")
    return pw3d_record_set(args.root, args.split, smpl_dir=args.smpl_dir,
                           visibility=args.visibility)
