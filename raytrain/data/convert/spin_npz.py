"""SPIN/CLIFF-style preprocessed ``.npz`` label files -> schema-v1 shards.

The format (one row per person instance; SPIN's ``data/dataset_extras/*.npz``, CLIFF's
pseudo-GT files):

    imgname  (N,)        image path relative to --img-root (str or bytes)
    center   (N, 2)      box centre, full-image pixels
    scale    (N,)        box side / 200 (SPIN's convention: side = 200 * scale)
    part     (N, 24, 3)  J24 2D keypoints + visibility        (optional)
    S        (N, 24, 4)  J24 3D joints, metres + confidence   (optional; (N,24,3) too)
    pose     (N, 72)     SMPL axis-angle, camera frame        (optional)
    shape    (N, 10)     SMPL betas                           (optional, with pose)
    has_smpl (N,)        0/1 (default: 1 where pose is given)  (optional)
    gender   (N,)        'm' / 'f' (other: neutral)           (optional)
    focal_length (N,) or ()  pixels (optional; default: default_focal of the image size)
    focal_l  (N,)        pixels: CLIFF's name for the per-row focal length   (optional)
    global_t (N, 3)      CLIFF: SMPL translation in the camera frame, metres (optional)

CLIFF's pseudo-GT files (``coco2014part_cliffGT.npz``, ``mpii_cliffGT.npz``) add
``focal_l`` and ``global_t`` to SPIN's keys. Their convention, from CLIFF's published
viewer (huawei-noah/noah-research, ``CLIFF/viz_cliffGT_perImg.py`` and
``CLIFF/common/renderer_pyrd.py``): the mesh is ``smplx.create(...)(global_orient=pose[:3],
body_pose=pose[3:], betas=shape, transl=global_t)``, i.e. ``R (X - J0) + J0 + global_t``
in an OpenCV camera frame (x right, y down, z forward) at the origin, projected with
``fx = fy = focal_l`` about the image centre ``(w // 2, h // 2)``. That is raytrain's
``cam_full`` (docs/design.md: SMPL translation in the camera frame, principal point at
the image centre), so ``global_t`` is stored as ``cam_full`` unchanged (``has_cam`` follows)
and ``focal_l`` as ``focal``. CLIFF's integer centre differs from the exact centre by at
most half a pixel.

Keys the converter does not use (SPIN's ``openpose``, ``maskname``, ...) are named in
the summary (``ConversionSummary.ignored_keys``), never dropped silently.

The file is loaded with ``allow_pickle=False``: an object-array npz is refused with a
message (re-save its string arrays as fixed-width unicode). 3D joints stored in
millimetres (SPIN stores metres; some re-exports do not) are detected per file and
converted. Whether a row's 3D joints are pelvis-relative (SPIN's MPI-INF-3DHP training
file) is recorded in its json meta as ``joints_3d_root_relative``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from functools import partial
from pathlib import PurePosixPath

import numpy as np

from .common import (
    ConversionError,
    ConversionSummary,
    Record,
    RecordSet,
    StorageConfig,
    convert_record_set,
    label_text,
    make_key,
)

#: Source name -> licence note written into the manifest (see datasets/README.md).
SOURCES = {
    "h36m": "Human3.6M: licence agreement from http://vision.imar.ro/human3.6m (research, "
            "non-commercial); SMPL fits under the SMPL model licence",
    "mpi_inf_3dhp": "MPI-INF-3DHP: licence of the Max Planck Institute for Informatics "
                    "(research, non-commercial; see the dataset's download page)",
    "coco": "COCO: annotations CC BY 4.0, images under their Flickr terms; SMPL pseudo-GT "
            "under its authors' licence and the SMPL model licence",
    "mpii": "MPII Human Pose: simplified BSD licence; SMPL pseudo-GT under its authors' "
            "licence and the SMPL model licence",
    "3dpw": "3DPW: non-commercial scientific research only (3DPW licence); SMPL model licence",
}

REQUIRED_NPZ_KEYS = ("imgname", "center", "scale")
#: Every key the converter reads; any other key of the file is reported as ignored.
USED_NPZ_KEYS = frozenset({*REQUIRED_NPZ_KEYS, "part", "S", "pose", "shape", "has_smpl", "gender",
                           "focal_length", "focal", "focal_l", "global_t"})
FOCAL_KEYS = ("focal_l", "focal_length", "focal")  # the first present is used
PELVIS_J24 = 14


def read_spin_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Load and check a SPIN-style npz (no pickles) -> dict of arrays.

    Everything a conversion needs is checked here, before anything is written: the
    file is a zip of plain arrays, the arrays' shapes agree, every ``imgname`` is UTF-8
    text naming a path inside the image root (no '..', not absolute), ``focal_length``
    has one value or one per row. Raises ``ConversionError`` (a ``ValueError``) naming
    the file and the problem."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: npz file not found") from None
    except IsADirectoryError:
        raise ConversionError(f"{path}: is a directory, expected an .npz file") from None
    if magic != b"PK\x03\x04":
        raise ConversionError(f"{path}: not an npz file (not a zip archive)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            data = {name: npz[name] for name in npz.files}
    except ValueError as error:
        if "allow_pickle" in str(error) or "Object arrays" in str(error):
            raise ConversionError(f"{path}: stores object arrays (pickles), which are not loaded; "
                                  "re-save its string arrays as fixed-width unicode "
                                  "(np.asarray(x, dtype=str))") from None
        raise ConversionError(f"{path}: not a readable npz ({error})") from None
    except Exception as error:  # noqa: BLE001 - zipfile / OSError: an unreadable file
        raise ConversionError(f"{path}: not a readable npz ({type(error).__name__}: {error})") from None
    missing = [key for key in REQUIRED_NPZ_KEYS if key not in data]
    if missing:
        raise ValueError(f"{path}: missing keys {missing} (has {sorted(data)})")
    n = len(data["imgname"])
    expected = {"center": (n, 2), "part": (n, 24, 3), "pose": (n, 72), "shape": (n, 10),
                "has_smpl": (n,), "gender": (n,)}
    for key, shape in expected.items():
        if key in data and data[key].shape != shape:
            raise ConversionError(f"{path}: {key} has shape {data[key].shape}, expected {shape}")
    if data["scale"].shape[0] != n:
        raise ValueError(f"{path}: scale has {data['scale'].shape[0]} rows, imgname {n}")
    if "S" in data and (data["S"].shape[:2] != (n, 24) or data["S"].shape[2] not in (3, 4)):
        raise ValueError(f"{path}: S has shape {data['S'].shape}, expected ({n}, 24, 4)")
    if "pose" in data and "shape" not in data:
        raise ValueError(f"{path}: has pose but no shape")
    if "global_t" in data and data["global_t"].shape != (n, 3):
        raise ConversionError(f"{path}: global_t has shape {data['global_t'].shape}, expected ({n}, 3)")
    for key in FOCAL_KEYS:
        if key in data and data[key].shape not in ((), (n,), (n, 1)):
            raise ConversionError(f"{path}: {key} has shape {data[key].shape}, expected ({n},) or ()")
    for key in ("center", "scale", "part", "S", "pose", "shape", "has_smpl", "global_t", *FOCAL_KEYS):
        if key in data and data[key].dtype.kind not in "biuf":
            raise ConversionError(f"{path}: {key} holds {data[key].dtype} values, expected numbers")
    if data["scale"].ndim not in (1, 2):
        raise ConversionError(f"{path}: scale has shape {data['scale'].shape}, expected ({n},)")
    for row, value in enumerate(data["imgname"]):
        try:
            name = label_text(value)
        except UnicodeDecodeError:
            raise ConversionError(f"{path}: imgname of row {row} is not UTF-8 text") from None
        if not _inside_root(name):
            raise ConversionError(f"{path}: imgname of row {row} ({name[:100]!r}) is not a relative "
                                  "path inside --img-root (no '..', not absolute)")
    return data


def ignored_npz_keys(data: dict) -> list[str]:
    """Keys of a loaded npz the converter does not read (named in the summary)."""
    return sorted(set(data) - USED_NPZ_KEYS)


def _inside_root(name: str) -> bool:
    """A relative path without '..' (a Windows drive or UNC path counts as absolute)."""
    rel = PurePosixPath(name.replace("\\", "/"))
    return (bool(name) and not rel.is_absolute() and ".." not in rel.parts and ":" not in name
            and "\0" not in name)


def _joints_in_metres(S: np.ndarray) -> np.ndarray:
    """(N, 24, 4) float64 in metres; a file whose valid coordinates look like mm is scaled."""
    if S.shape[2] == 3:
        S = np.concatenate([S, np.ones(S.shape[:2] + (1,))], axis=2)
    S = S.astype(np.float64)
    valid = S[..., 3] > 0
    coords = np.abs(S[..., :3][valid])
    if coords.size and np.nanmedian(coords) > 20.0:  # people are not 20 m away: millimetres
        S = S.copy()
        S[..., :3] /= 1000.0
    return S


def spin_npz_records(data: dict[str, np.ndarray], img_root: str, source: str) -> Iterator[Record]:
    """One ``Record`` per npz row (``data`` from ``read_spin_npz``)."""
    n = len(data["imgname"])
    scale = np.asarray(data["scale"], dtype=np.float64)
    if scale.ndim == 2:  # (N, 2) per-axis scales: the square box of the larger side
        scale = scale.max(axis=1)
    S = _joints_in_metres(data["S"]) if "S" in data else None
    has_smpl = (np.asarray(data["has_smpl"]).astype(bool) if "has_smpl" in data
                else np.ones(n, dtype=bool))
    focal = next((data[key] for key in FOCAL_KEYS if key in data), None)
    global_t = data.get("global_t")
    if focal is not None:
        focal = np.broadcast_to(np.asarray(focal, dtype=np.float64).reshape(-1)
                                if np.ndim(focal) else np.asarray(focal, np.float64), (n,))
    for row in range(n):
        name = label_text(data["imgname"][row])
        rel = PurePosixPath(name.replace("\\", "/"))
        sequence = "-".join(rel.parent.parts) or "_"
        labels = {
            "box": [*np.asarray(data["center"][row], np.float64), 200.0 * scale[row]],
            "keypoints_2d": data["part"][row] if "part" in data else None,
            "gender": label_text(data["gender"][row]) if "gender" in data else None,
            "focal": None if focal is None else float(focal[row]),
            "cam_full": None if global_t is None else np.asarray(global_t[row], np.float64),
            "meta": {"imgname": name},
        }
        if S is not None:
            labels["joints_3d"] = S[row]
            pelvis = S[row, PELVIS_J24]
            labels["meta"]["joints_3d_root_relative"] = bool(
                pelvis[3] > 0 and np.all(np.abs(pelvis[:3]) < 1e-4))
        if "pose" in data:
            labels.update(pose=data["pose"][row], betas=data["shape"][row],
                          has_smpl=bool(has_smpl[row]))
        yield Record(key=make_key(source, sequence, rel.stem, row),
                     image_path=os.path.join(img_root, *rel.parts), labels=labels)


def _records_from_file(npz: str, img_root: str, source: str) -> Iterator[Record]:
    """The records of an npz file, read afresh (a ``RecordSet`` factory: picklable)."""
    return spin_npz_records(read_spin_npz(npz), img_root, source)


def spin_npz_record_set(npz: str | os.PathLike, img_root: str | os.PathLike, source: str,
                        licence: str | None = None) -> RecordSet:
    """The ``RecordSet`` of one SPIN/CLIFF-style npz (checked now, read again per use)."""
    if licence is None:
        if source not in SOURCES:
            raise ValueError(f"unknown source {source!r} (known: {sorted(SOURCES)}); "
                             "pass licence=...")
        licence = SOURCES[source]
    data = read_spin_npz(npz)
    if not os.path.isdir(img_root):
        raise ConversionError(f"--img-root {os.fspath(img_root)}: not a directory")
    return RecordSet(source=source, licence=licence, total=len(data["imgname"]),
                     make_records=partial(_records_from_file, os.fspath(npz),
                                          os.fspath(img_root), source),
                     ignored_keys=ignored_npz_keys(data))


def convert_spin_npz(npz: str | os.PathLike, img_root: str | os.PathLike, out: str,
                     source: str, *, licence: str | None = None, limit: int | None = None,
                     workers: int = 1, maxcount: int = 1000,
                     storage: StorageConfig | None = None, progress: bool = True,
                     printer=print, overwrite: bool = False) -> ConversionSummary:
    """Convert one SPIN-style npz (images under ``img_root``) into shards under ``out``."""
    record_set = spin_npz_record_set(npz, img_root, source, licence)
    return convert_record_set(record_set, out, limit=limit, workers=workers, maxcount=maxcount,
                              storage=storage, progress=progress, printer=printer, overwrite=overwrite)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``raytrain shard <source>`` options of a SPIN/CLIFF-style npz source."""
    parser.add_argument("--npz", required=True, help="SPIN/CLIFF-style label file (.npz)")
    parser.add_argument("--img-root", required=True,
                        help="directory the npz's imgname paths are relative to")


def record_set_from_args(source: str, args: argparse.Namespace) -> RecordSet:
    return spin_npz_record_set(args.npz, args.img_root, source)
