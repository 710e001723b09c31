"""SMPL body model (via smplx) with the H36M regressor and the project's joint sets.

`smpl_dir` holds SMPL_{NEUTRAL,MALE,FEMALE}.pkl, J_regressor_h36m.npy and
smpl_mean_params.npz (SPIN's files). The command-line entry points fill in the synthetic
body model's directory when no SMPL files are given (`raytrain.synthetic.body_model`);
this module only reads files it is pointed at.
"""
from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import smplx
import torch
from smplx.lbs import batch_rodrigues
from smplx.utils import Struct

from ..safe_pickle import UnsafePickleError, safe_load
from .joints import H36M_TO_J14

GENDER_FILES = {"neutral": "SMPL_NEUTRAL.pkl", "male": "SMPL_MALE.pkl", "female": "SMPL_FEMALE.pkl"}
H36M_REGRESSOR_FILE = "J_regressor_h36m.npy"
MEAN_PARAMS_FILE = "smpl_mean_params.npz"
REQUIRED_FILES = (GENDER_FILES["neutral"], H36M_REGRESSOR_FILE, MEAN_PARAMS_FILE)

_SMPL_KEYS = ("v_template", "f", "weights", "kintree_table", "J_regressor", "shapedirs", "posedirs")
# Indices of smplx's vertex-selected joints after the 24 SMPL joints.
_NOSE, _REYE, _LEYE, _REAR, _LEAR = 24, 25, 26, 27, 28


class BodyModelError(Exception):
    """A missing or malformed body model file (one line naming the file)."""


class BodyOutput(NamedTuple):
    """Output of BodyModel.forward (N persons, metres, model frame)."""
    vertices: torch.Tensor      # (N, 6890, 3)
    joints_smpl: torch.Tensor   # (N, 24, 3) SMPL kinematic joints
    joints_h36m: torch.Tensor   # (N, 17, 3) H36M regressor, SPIN order
    joints_j24: torch.Tensor    # (N, 24, 3) J24 order (docs/CONVENTIONS.md)


# --------------------------------------------------------------------------- files


def raytrain_home() -> Path:
    """$RAYTRAIN_HOME or ~/.cache/raytrain."""
    return Path(os.environ.get("RAYTRAIN_HOME") or Path.home() / ".cache" / "raytrain")


def ensure_body_model_dir(smpl_dir: str | os.PathLike | None) -> Path:
    """`smpl_dir` checked for the required files (one-line BodyModelError otherwise)."""
    if smpl_dir is None:
        raise BodyModelError("model.smpl_dir is not set: point it at a directory with "
                             f"{', '.join(REQUIRED_FILES)} (the raytrain commands use the "
                             "synthetic body model when none is given)")
    path = Path(smpl_dir).expanduser()
    if not path.is_dir():
        raise BodyModelError(f"{path}: body model directory not found "
                             f"(expected {', '.join(REQUIRED_FILES)})")
    for name in REQUIRED_FILES:
        _require_file(path, name)
    return path


def is_complete_body_model_dir(path: Path) -> bool:
    """Every gender's SMPL file and the required files are there."""
    return all((path / name).is_file() for name in (*GENDER_FILES.values(), *REQUIRED_FILES))


def _require_file(smpl_dir: Path, name: str) -> Path:
    path = smpl_dir / name
    if not path.is_file():
        raise BodyModelError(f"{name} in {smpl_dir}: file not found")
    return path


def read_smpl_pickle(smpl_dir: Path, gender: str) -> dict:
    """Load and check one SMPL_<GENDER>.pkl -> dict of arrays (smplx's data struct)."""
    name = GENDER_FILES[gender]
    path = _require_file(smpl_dir, name)
    where = f"{name} in {smpl_dir}"
    try:
        data = safe_load(path, allow_sparse=True)
    except UnsafePickleError as exc:
        hint = (" (convert the official file with smplx's tools/clean_ch.py)" if "chumpy" in str(exc) else "")
        raise BodyModelError(f"{where}: {str(exc).split(': ', 1)[-1]}{hint}") from None
    except Exception as exc:   # noqa: BLE001 - any unpickling failure is a bad file
        raise BodyModelError(f"{where}: not a readable pickle ({type(exc).__name__}) "
                             "(expected an SMPL model pickle)") from None
    _check_smpl_dict(data, where)
    return data


def _check_smpl_dict(data, where: str) -> None:
    """Keys and shapes smplx.SMPL relies on; raises BodyModelError."""
    if not isinstance(data, dict):
        raise BodyModelError(f"{where}: holds a {type(data).__name__}, expected an SMPL "
                             "model dict")
    for key in _SMPL_KEYS:
        if key not in data:
            raise BodyModelError(f"{where}: missing key '{key}' (expected an SMPL model pickle)")
    v = np.shape(data["v_template"])[0]
    expected = {"v_template": (v, 3), "f": (None, 3), "weights": (v, 24),
                "kintree_table": (2, 24), "J_regressor": (24, v), "shapedirs": (v, 3, None),
                "posedirs": (v, 3, 207)}
    for key, pattern in expected.items():
        shape = tuple(np.shape(data[key]))
        ok = len(shape) == len(pattern) and all(p in (None, s) for p, s in zip(pattern, shape))
        if key == "shapedirs":
            ok = ok and shape[-1] >= 10
        if not ok:
            want = "(" + ", ".join("N" if p is None else str(p) for p in pattern) + ")"
            raise BodyModelError(f"{where}: '{key}' has shape {shape}, expected {want}")
    for key in expected:
        values = _numeric(data[key], key, where)
        if not np.isfinite(values).all():
            raise BodyModelError(f"{where}: '{key}' holds NaN or infinite values")
    faces, parents = _numeric(data["f"], "f", where), _numeric(data["kintree_table"], "kintree_table", where)[0]
    if faces.size and (faces.min() < 0 or faces.max() >= v):
        raise BodyModelError(f"{where}: 'f' names vertices outside 0..{v - 1}")
    if any(not 0 <= parent < joint for joint, parent in enumerate(parents[1:], 1)):
        raise BodyModelError(f"{where}: 'kintree_table' names a parent joint that does not come before its child")


def _numeric(value, key: str, where: str) -> np.ndarray:
    """A label array (dense or scipy sparse) as a numeric numpy array; BodyModelError else."""
    values = value.toarray() if hasattr(value, "toarray") and not isinstance(value, np.ndarray) else value
    try:
        values = np.asarray(values)
    except Exception as exc:  # noqa: BLE001 - any object that is not an array
        raise BodyModelError(f"{where}: '{key}' is not an array ({type(exc).__name__})") from None
    if values.dtype.kind not in "biuf":
        raise BodyModelError(f"{where}: '{key}' holds {values.dtype} values, expected numbers")
    return values


def read_h36m_regressor(smpl_dir: Path, num_vertices: int = 6890) -> np.ndarray:
    """J_regressor_h36m.npy -> (17, V) float32."""
    path = _require_file(smpl_dir, H36M_REGRESSOR_FILE)
    try:
        reg = np.load(path, allow_pickle=False)
    except Exception as exc:   # noqa: BLE001
        raise BodyModelError(f"{H36M_REGRESSOR_FILE} in {smpl_dir}: not a readable .npy "
                             f"({type(exc).__name__}), expected a (17, {num_vertices}) "
                             "array") from None
    if reg.shape != (17, num_vertices):
        raise BodyModelError(f"{H36M_REGRESSOR_FILE} in {smpl_dir}: expected shape "
                             f"(17, {num_vertices}), got {reg.shape}")
    return reg.astype(np.float32)


def load_mean_params(smpl_dir: str | os.PathLike | None = None) -> dict:
    """Mean parameters as tensors: `pose` (144,) in the project's 6D layout (per joint the
    first then the second rotation column, see raytrain.geometry.rotation), `shape` (10,),
    `cam` (3,). The file stores SPIN's layout (rows of the 3x2 column block)."""
    smpl_dir = ensure_body_model_dir(smpl_dir)
    path = _require_file(smpl_dir, MEAN_PARAMS_FILE)
    where = f"{MEAN_PARAMS_FILE} in {smpl_dir}"
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: np.asarray(npz[k]) for k in npz.files}
    except Exception as exc:   # noqa: BLE001
        raise BodyModelError(f"{where}: not a readable .npz ({type(exc).__name__}), "
                             "expected arrays pose (144,), shape (10,), cam (3,)") from None
    for key, shape in (("pose", (144,)), ("shape", (10,)), ("cam", (3,))):
        if key not in arrays:
            raise BodyModelError(f"{where}: missing array '{key}' (expected pose, shape, cam)")
        if arrays[key].shape != shape:
            raise BodyModelError(f"{where}: '{key}' has shape {arrays[key].shape}, "
                                 f"expected {shape}")
    block = arrays["pose"].reshape(24, 3, 2)
    pose = np.concatenate([block[:, :, 0], block[:, :, 1]], axis=1).reshape(-1)
    return {"pose": torch.tensor(pose, dtype=torch.float32),
            "shape": torch.tensor(arrays["shape"], dtype=torch.float32),
            "cam": torch.tensor(arrays["cam"], dtype=torch.float32)}


# --------------------------------------------------------------------------- model


class BodyModel(torch.nn.Module):
    """SMPL (one smplx.SMPL per loaded gender) plus the H36M joint regressor.

    It has no parameters and an empty state_dict (everything comes from the files), so it
    can sit inside a network without bloating checkpoints.

    forward(pose_rotmat (N, 24, 3, 3), betas (N, 10), gender=None) -> BodyOutput.
    `faces` is (F, 3) int64 numpy.
    """

    def __init__(self, smpl_dir: str | os.PathLike | None = None,
                 genders: Sequence[str] = ("neutral",)):
        super().__init__()
        self.smpl_dir = ensure_body_model_dir(smpl_dir)
        self.genders = tuple(dict.fromkeys(genders))
        unknown = [g for g in self.genders if g not in GENDER_FILES]
        if unknown or not self.genders:
            raise ValueError(f"genders must be among {tuple(GENDER_FILES)}, got {genders!r}")
        self.smpl = torch.nn.ModuleDict({g: self._make_smpl(g) for g in self.genders})
        first = self.smpl[self.genders[0]]
        self.faces = np.asarray(first.faces, dtype=np.int64)
        reg = read_h36m_regressor(self.smpl_dir, first.get_num_verts())
        self.register_buffer("J_regressor_h36m", torch.from_numpy(reg), persistent=False)

    def _make_smpl(self, gender: str) -> smplx.SMPL:
        data = read_smpl_pickle(self.smpl_dir, gender)
        try:
            with contextlib.redirect_stdout(io.StringIO()):   # smplx prints a 10-betas warning
                smpl = smplx.SMPL(str(self.smpl_dir), data_struct=Struct(**data), gender=gender,
                                  create_betas=False, create_global_orient=False,
                                  create_body_pose=False, create_transl=False)
        except Exception as exc:  # noqa: BLE001 - whatever smplx makes of a checked but odd file
            first = (str(exc).splitlines() or [""])[0][:200]
            raise BodyModelError(f"{GENDER_FILES[gender]} in {self.smpl_dir}: smplx cannot build the model "
                                 f"({type(exc).__name__}: {first})") from None
        _make_buffers_non_persistent(smpl)
        return smpl

    def forward(self, pose_rotmat: torch.Tensor, betas: torch.Tensor,
                gender: str | Sequence[str] | None = None) -> BodyOutput:
        """pose_rotmat (N, 24, 3, 3), betas (N, 10); gender None (neutral or the first
        loaded), one name, or a list with one name per sample."""
        genders = self._gender_list(gender, pose_rotmat.shape[0])
        if len(set(genders)) == 1:
            return self._run(genders[0], pose_rotmat, betas)
        parts = {}
        for g in dict.fromkeys(genders):
            idx = torch.tensor([i for i, x in enumerate(genders) if x == g],
                               device=pose_rotmat.device)
            parts[g] = (idx, self._run(g, pose_rotmat[idx], betas[idx]))
        return _scatter(parts, pose_rotmat.shape[0])

    def forward_axis_angle(self, pose: torch.Tensor, betas: torch.Tensor,
                           gender: str | Sequence[str] | None = None) -> BodyOutput:
        """pose (N, 72) SMPL axis-angle, betas (N, 10) -> BodyOutput."""
        rotmat = batch_rodrigues(pose.reshape(-1, 3)).reshape(pose.shape[0], 24, 3, 3)
        return self.forward(rotmat, betas, gender)

    def _gender_list(self, gender, n: int) -> list:
        default = "neutral" if "neutral" in self.genders else self.genders[0]
        if gender is None or isinstance(gender, str):
            genders = [gender or default] * n
        else:
            genders = list(gender)
            if len(genders) != n:
                raise ValueError(f"gender list has {len(genders)} entries for {n} samples")
        missing = sorted(set(genders) - set(self.genders))
        if missing:
            raise ValueError(f"gender(s) {missing} not loaded (loaded: {list(self.genders)}); "
                             "pass genders=... to load_body_model")
        return genders

    def _run(self, gender: str, pose_rotmat: torch.Tensor, betas: torch.Tensor) -> BodyOutput:
        out = self.smpl[gender](betas=betas, global_orient=pose_rotmat[:, :1],
                                body_pose=pose_rotmat[:, 1:], pose2rot=False)
        vertices, joints = out.vertices, out.joints
        h36m = torch.einsum("jv,nvc->njc", self.J_regressor_h36m.to(vertices.dtype), vertices)
        return BodyOutput(vertices, joints[:, :24], h36m, _j24(h36m, joints))


def _make_buffers_non_persistent(module: torch.nn.Module) -> None:
    """Keep the (large, file-derived) model arrays out of state_dict / checkpoints."""
    for sub in module.modules():
        for name, buf in list(sub.named_buffers(recurse=False)):
            sub.register_buffer(name, buf, persistent=False)


def _j24(h36m: torch.Tensor, joints: torch.Tensor) -> torch.Tensor:
    """J24 (N, 24, 3) from H36M joints (N, 17, 3) and smplx joints (N, 24 + extra, 3).

    Limbs, neck, head top, pelvis, thorax, spine from H36M rows; jaw = SMPL head joint
    (base of the skull, jaw height); head = midpoint of H36M neck/nose and head top;
    nose, eyes, ears = smplx's vertex-selected joints.
    """
    j14 = h36m[:, list(H36M_TO_J14)]
    head = 0.5 * (h36m[:, 9:10] + h36m[:, 10:11])
    face = joints[:, [_NOSE, _LEYE, _REYE, _LEAR, _REAR]]
    return torch.cat([j14, h36m[:, [0, 8, 7]], joints[:, 15:16], head, face], dim=1)


def _scatter(parts: dict, n: int) -> BodyOutput:
    """Reassemble per-gender outputs {g: (indices, BodyOutput)} into sample order."""
    order = torch.cat([idx for idx, _ in parts.values()])
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(n, device=order.device)
    return BodyOutput(*(torch.cat([out[k] for _, out in parts.values()])[inverse]
                        for k in range(len(BodyOutput._fields))))


def load_body_model(smpl_dir: str | os.PathLike | None = None,
                    genders: Sequence[str] = ("neutral",)) -> BodyModel:
    """BodyModel for `smpl_dir` (None: the synthetic model) with the given genders."""
    return BodyModel(smpl_dir, genders)


def check_body_model(smpl_dir: str | os.PathLike | None, genders: Sequence[str] = tuple(GENDER_FILES)) -> None:
    """Load every file a training run reads from `smpl_dir` once (the SMPL pickles of
    `genders`, the H36M regressor, the mean parameters): a file that exists but does not
    load is a one-line BodyModelError here, not an error in every worker."""
    load_body_model(smpl_dir, genders)
    load_mean_params(smpl_dir)


def root_joint_model(body_model) -> tuple[np.ndarray, np.ndarray]:
    """(mean (3,), dirs (3, 10)) of the SMPL root joint as a linear function of betas.

    ``body_model`` is a ``BodyModel`` (its first smplx layer is used) or a
    smplx layer with ``J_regressor``, ``v_template`` and ``shapedirs``.
    """
    layer = smpl_layer(body_model)
    regressor = _numpy(layer.J_regressor)[0]  # (V,)
    mean = regressor @ _numpy(layer.v_template)  # (3,)
    dirs = np.einsum("v,vcb->cb", regressor, _numpy(layer.shapedirs)[..., :10])  # (3, 10)
    return mean, dirs


def smpl_layer(body_model):
    """The (first) smplx layer of a ``BodyModel`` (``.smpl`` ModuleDict) or the layer itself."""
    layer = getattr(body_model, "smpl", body_model)
    if hasattr(layer, "values") and not hasattr(layer, "v_template"):
        layer = next(iter(layer.values()))
    return layer


def _numpy(value) -> np.ndarray:
    return value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
