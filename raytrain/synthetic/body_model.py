"""A synthetic human body model written in the exact file format of SMPL.

Real SMPL files are licensed, so without `--smpl-dir` the project generates this model
and loads it with the real `smplx.SMPL` loader. The body is a set of closed tubes (torso,
head, neck, collars, arm/leg segments, palms, fingers, feet), each a capped generalised
cylinder with a proper closed triangulation, posed in SMPL's T-pose frame: y up, facing
+z, the person's left side at +x, pelvis at the origin, about 1.7 m tall.

Written files (`write_synthetic_body_model`):
- SMPL_{NEUTRAL,MALE,FEMALE}.pkl: dicts of numpy arrays plus a scipy.sparse J_regressor,
  with the keys and shapes `smplx.SMPL` reads (6890 vertices, 24 joints, SMPL tree).
- J_regressor_h36m.npy (17, 6890): rows sum to 1, in SPIN's H36M joint order.
- smpl_mean_params.npz: `pose` (144,) in SPIN's layout (per joint the 3x2 matrix of the
  first two rotation columns, row-major), `shape` (10,), `cam` (3,).

Everything is a deterministic function of `seed` (which drives the pose blend shapes).
The vertices smplx reads as extra joints (nose, eyes, ears, toes, heels, fingertips, see
`smplx.vertex_ids.vertex_ids['smplh']`) are placed at the matching anatomical spots.
"""
from __future__ import annotations

import os
import pickle
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import scipy.sparse
from scipy.spatial import cKDTree

from ..body.joints import SMPL_PARENTS
from ..body.model import BodyModelError, is_complete_body_model_dir, raytrain_home

NUM_VERTICES = 6890
NUM_JOINTS = 24
NUM_BETAS = 10
GENDERS = ("neutral", "male", "female")
FILE_FORMAT_VERSION = 2

# smplx.vertex_ids.vertex_ids['smplh'], copied as data so generation needs no smplx.
LANDMARK_VERTEX_IDS = {
    "nose": 332, "reye": 6260, "leye": 2800, "rear": 4071, "lear": 583,
    "rthumb": 6191, "rindex": 5782, "rmiddle": 5905, "rring": 6016, "rpinky": 6133,
    "lthumb": 2746, "lindex": 2319, "lmiddle": 2445, "lring": 2556, "lpinky": 2673,
    "LBigToe": 3216, "LSmallToe": 3226, "LHeel": 3387,
    "RBigToe": 6617, "RSmallToe": 6624, "RHeel": 6787,
}

# Body proportions: every shape blend shape is the derivative of the mesh with respect to
# one of these, so the betas have a meaning (in this order, one standard deviation each).
BETA_PARAMS = (
    ("height", 0.04), ("girth", 0.08), ("leg_length", 0.05), ("torso_length", 0.05),
    ("arm_length", 0.05), ("shoulder_width", 0.06), ("hip_width", 0.06),
    ("belly", 0.12), ("head_size", 0.05), ("limb_girth", 0.08),
)
#: What else changes with the first shape coefficient, per unit of height: taller bodies
#: have longer legs, relatively smaller heads and slimmer builds, as SMPL's first
#: component does. Without it that coefficient is an exact uniform scale of the body, and
#: a body's size could not be told from its distance to the camera in an image at all.
HEIGHT_COUPLING = {"leg_length": 1.0, "head_size": -0.75, "girth": -0.5}
_BASE_PARAMS = {name: 1.0 for name, _ in BETA_PARAMS}
GENDER_PARAMS = {
    "neutral": {**_BASE_PARAMS, "height": 0.975, "bust": 0.4},
    "male": {**_BASE_PARAMS, "height": 1.01, "shoulder_width": 1.07, "hip_width": 0.95,
             "girth": 1.03, "limb_girth": 1.06, "bust": 0.0},
    "female": {**_BASE_PARAMS, "height": 0.945, "shoulder_width": 0.92, "hip_width": 1.08,
               "girth": 0.97, "limb_girth": 0.92, "belly": 0.95, "bust": 1.0},
}

# Mean pose (axis-angle per SMPL joint) for the regressor's initial estimate: rotated by
# pi about x (camera frame, y down, facing the camera), arms lowered, elbows/knees bent.
MEAN_POSE_AXIS_ANGLE = {
    0: (np.pi, 0.0, 0.0), 1: (-0.12, 0.0, 0.03), 2: (-0.12, 0.0, -0.03),
    4: (0.2, 0.0, 0.0), 5: (0.2, 0.0, 0.0), 13: (0.0, 0.0, -0.1), 14: (0.0, 0.0, 0.1),
    16: (0.0, 0.0, -1.0), 17: (0.0, 0.0, 1.0), 18: (0.0, -0.35, 0.0), 19: (0.0, 0.35, 0.0),
}
MEAN_CAM = (0.9, 0.0, 0.0)


# --------------------------------------------------------------------------- primitives


@dataclass
class TubeSpec:
    """A capped generalised cylinder from p0 to p1 (poles at both ends).

    knots: (K, 6) rows (s, width radius, depth radius, shift x, y, z) along s in [0, 1];
    width is measured along `width_dir`, depth along axis x width. Skinning: the axial
    coordinate (metres from p0 along the axis) is split at `bounds` between `joints`.
    """
    name: str
    p0: np.ndarray
    p1: np.ndarray
    width_dir: np.ndarray
    knots: np.ndarray
    n_rings: int
    n_seg: int
    roundness: float
    joints: tuple
    bounds: tuple = ()
    blend: float = 0.04
    regress_at: dict = field(default_factory=dict)   # regressor key -> axial metres from p0

    @property
    def num_vertices(self) -> int:
        return self.n_rings * self.n_seg + 2


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _frame(spec: TubeSpec):
    """Orthonormal right-handed frame (axis, e1 width, e2 depth) of a tube."""
    axis = _unit(spec.p1 - spec.p0)
    e1 = _unit(spec.width_dir - np.dot(spec.width_dir, axis) * axis)
    return axis, e1, np.cross(axis, e1)


def _ring_params(spec: TubeSpec):
    """Axial parameters s (R,) of the rings (denser near the poles) and cap factors q (R,)."""
    theta = np.arange(1, spec.n_rings + 1) / (spec.n_rings + 1)
    s = (1.0 - np.cos(np.pi * theta)) / 2.0
    return s, np.sin(np.pi * theta) ** spec.roundness


def _interp_knots(knots: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Knot columns 1.. interpolated at s -> (len(s), 5)."""
    return np.stack([np.interp(s, knots[:, 0], knots[:, c]) for c in range(1, 6)], axis=1)


def tube_vertices(spec: TubeSpec) -> np.ndarray:
    """Vertices (R*S + 2, 3): start pole, rings (ring-major), end pole."""
    axis, e1, e2 = _frame(spec)
    s, q = _ring_params(spec)
    prof = _interp_knots(spec.knots, s)                                   # (R, 5)
    centers = spec.p0 + s[:, None] * (spec.p1 - spec.p0) + prof[:, 2:5]  # (R, 3)
    phi = 2.0 * np.pi * np.arange(spec.n_seg) / spec.n_seg
    rw, rd = (prof[:, 0] * q)[:, None, None], (prof[:, 1] * q)[:, None, None]
    rings = (centers[:, None, :] + rw * np.cos(phi)[None, :, None] * e1
             + rd * np.sin(phi)[None, :, None] * e2)
    ends = _interp_knots(spec.knots, np.array([0.0, 1.0]))[:, 2:5]
    return np.concatenate([spec.p0[None] + ends[:1], rings.reshape(-1, 3),
                           spec.p1[None] + ends[1:]])


def tube_faces(n_rings: int, n_seg: int) -> np.ndarray:
    """Closed, outward-oriented triangulation (2 * R * S, 3) of a tube's vertices."""
    ring = lambda k, j: 1 + k * n_seg + (j % n_seg)                       # noqa: E731
    end = 1 + n_rings * n_seg
    faces = []
    for j in range(n_seg):
        faces.append((0, ring(0, j + 1), ring(0, j)))
        faces.append((end, ring(n_rings - 1, j), ring(n_rings - 1, j + 1)))
        for k in range(n_rings - 1):
            a, b = ring(k, j), ring(k, j + 1)
            c, d = ring(k + 1, j + 1), ring(k + 1, j)
            faces.extend([(a, b, c), (a, c, d)])
    return np.asarray(faces, dtype=np.int64)


def _smoothstep(e0: float, e1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _chain_weights(coord: np.ndarray, bounds, joints, blend: float) -> np.ndarray:
    """Skinning weights (n, 24) splitting a 1-D coordinate at `bounds` between `joints`.

    At each bound the two neighbouring joints share the vertex 50/50, blending smoothly
    over +-blend metres.
    """
    steps = [_smoothstep(b - blend, b + blend, coord) for b in bounds]
    weights = np.zeros((coord.shape[0], NUM_JOINTS))
    lower = np.ones_like(coord)
    for joint, step in zip(joints, steps + [np.zeros_like(coord)]):
        weights[:, joint] += lower - step
        lower = step
    return weights


# --------------------------------------------------------------------------- body layout


def _knots(*rows) -> np.ndarray:
    """Knot rows (s, rw, rd[, sx, sy, sz]) -> (K, 6)."""
    return np.array([tuple(r) + (0.0,) * (6 - len(r)) for r in rows], dtype=np.float64)


def design_joints(p: dict) -> np.ndarray:
    """T-pose joint positions (24, 3) in metres for body proportions p (before height)."""
    sw, hw, lg, t, arm = (p["shoulder_width"], p["hip_width"], p["leg_length"],
                          p["torso_length"], p["arm_length"])
    j = np.zeros((NUM_JOINTS, 3))
    for side, (hip, knee, ankle, foot) in ((1, (1, 4, 7, 10)), (-1, (2, 5, 8, 11))):
        j[hip] = (side * 0.085 * hw, -0.085, 0.0)
        j[knee] = (side * 0.095 * hw, -0.085 - 0.405 * lg, 0.005)
        j[ankle] = (side * 0.09 * hw, j[knee, 1] - 0.42 * lg, -0.025)
        j[foot] = (side * 0.11 * hw, j[ankle, 1] - 0.05 * lg, -0.025 + 0.125 * lg)
    j[3], j[6], j[9] = (0, 0.11 * t, -0.015), (0, 0.245 * t, -0.01), (0, 0.30 * t, -0.005)
    j[12] = (0, 0.515 * t, -0.03)
    j[15] = (0, 0.515 * t + 0.075 * p["head_size"], -0.005)
    for side, (collar, shoulder, elbow, wrist, hand) in ((1, (13, 16, 18, 20, 22)),
                                                         (-1, (14, 17, 19, 21, 23))):
        j[collar] = (side * 0.07 * sw, 0.43 * t, -0.02)
        j[shoulder] = (side * 0.175 * sw, 0.445 * t, -0.025)
        j[elbow] = j[shoulder] + (side * 0.255 * arm, -0.01, -0.01)
        j[wrist] = j[elbow] + (side * 0.245 * arm, 0.0, -0.005)
        j[hand] = j[wrist] + (side * 0.085 * arm, -0.005, 0.0)
    return j


def _axial(p0, p1, point) -> float:
    return float(np.dot(point - p0, _unit(p1 - p0)))


def _limb(name, a, b, ext0, ext1, width_dir, knots, res, joints, blend=0.04, regress=None):
    """A tube along the segment a->b extended by ext0 before a and ext1 after b.

    joints: (parent, primary, child) split at a and b, or (primary,) for a rigid part.
    """
    d = _unit(b - a)
    p0, p1 = a - ext0 * d, b + ext1 * d
    bounds = (ext0, ext0 + np.linalg.norm(b - a)) if len(joints) == 3 else ()
    regress = {k: _axial(p0, p1, v) for k, v in (regress or {}).items()}
    return TubeSpec(name, p0, p1, np.asarray(width_dir, float), knots, res[0], res[1], 0.35,
                    tuple(joints), bounds, blend, regress)


def _torso(p: dict, j: np.ndarray) -> TubeSpec:
    t, g, hw, sw, belly = (p["torso_length"], p["girth"], p["hip_width"],
                           p["shoulder_width"], p["belly"])
    y0, y1 = -0.15, 0.56 * t
    rows = [(-0.15, 0.11 * hw, 0.075, 0.0), (-0.09, 0.165 * hw, 0.105, -0.005),
            (0.0, 0.16 * hw, 0.105, 0.0), (0.10 * t, 0.14, 0.095 * belly, 0.005 * belly),
            (0.22 * t, 0.15, 0.105 * belly, 0.01), (0.33 * t, 0.165 * sw, 0.11, 0.0),
            (0.42 * t, 0.175 * sw, 0.09, -0.02), (0.49 * t, 0.10 * sw, 0.07, -0.025),
            (0.56 * t, 0.06, 0.055, -0.03)]
    knots = _knots(*[((y - y0) / (y1 - y0), rx * g, rz * g, 0.0, 0.0, cz)
                     for y, rx, rz, cz in rows])
    p0, p1 = np.array([0.0, y0, 0.0]), np.array([0.0, y1, 0.0])
    bounds = tuple(j[k, 1] - y0 for k in (3, 6, 9, 12))
    regress = {k: j[k, 1] - y0 for k in (0, 3, 6, 9)}
    regress.update({"h36m_spine": 0.2 * t - y0, "h36m_thorax": 0.47 * t - y0})
    return TubeSpec("torso", p0, p1, np.array([1.0, 0, 0]), knots, 50, 44, 0.25,
                    (0, 3, 6, 9, 12), bounds, 0.035, regress)


def _head(p: dict, j: np.ndarray) -> TubeSpec:
    h = p["head_size"]
    p0, p1 = j[15] + (0, -0.045 * h, 0), j[15] + (0, 0.185 * h, 0)
    knots = _knots((0.0, 0.05 * h, 0.06 * h, 0, 0, 0.01), (0.3, 0.075 * h, 0.095 * h, 0, 0, 0.02),
                   (0.6, 0.08 * h, 0.10 * h, 0, 0, 0.02), (1.0, 0.07 * h, 0.085 * h, 0, 0, 0.01))
    regress = {"h36m_neck_nose": 0.095 * h}
    return TubeSpec("head", p0, p1, np.array([1.0, 0, 0]), knots, 24, 32, 0.6, (15,),
                    (), 0.04, regress)


def _arm_parts(p: dict, j: np.ndarray, side: int) -> list:
    collar, shoulder, elbow, wrist, hand = (13, 16, 18, 20, 22) if side > 0 else (14, 17, 19, 21, 23)
    g = p["girth"] * p["limb_girth"]
    up, fwd = (0, 1.0, 0), (0, 0, 1.0)
    inner = j[collar] * (0.4, 1, 1)
    parts = [
        _limb(f"collar{side}", inner, j[shoulder], 0.0, 0.045, up,
              _knots((0, 0.05 * g, 0.06 * g), (1, 0.045 * g, 0.05 * g)), (8, 16),
              (9, collar, shoulder), regress={collar: j[collar], shoulder: j[shoulder]}),
        _limb(f"upperarm{side}", j[shoulder], j[elbow], 0.045, 0.03, up,
              _knots((0, 0.05 * g, 0.052 * g), (0.35, 0.047 * g, 0.05 * g),
                     (1, 0.038 * g, 0.04 * g)), (16, 16), (collar, shoulder, elbow),
              regress={shoulder: j[shoulder], elbow: j[elbow]}),
        _limb(f"forearm{side}", j[elbow], j[wrist], 0.03, 0.015, up,
              _knots((0, 0.038 * g, 0.042 * g), (0.3, 0.04 * g, 0.044 * g),
                     (1, 0.022 * g, 0.03 * g)), (14, 16), (shoulder, elbow, wrist),
              regress={elbow: j[elbow], wrist: j[wrist]}),
        _limb(f"palm{side}", j[wrist], j[hand], 0.015, 0.025, fwd,
              _knots((0, 0.032, 0.016), (0.5, 0.043, 0.015), (1, 0.043, 0.013)), (8, 12),
              (elbow, wrist, hand), blend=0.02, regress={wrist: j[wrist], hand: j[hand]}),
    ]
    return parts + _finger_parts(p, j, side, wrist, hand)


def _finger_parts(p: dict, j: np.ndarray, side: int, wrist: int, hand: int) -> list:
    a = p["arm_length"]
    along, fwd = _unit(j[hand] - j[wrist]), np.array([0, 0, 1.0])
    knots = _knots((0, 0.0085, 0.008), (1, 0.0075, 0.007))
    parts = []
    for name, z, length in (("index", 0.027, 0.075), ("middle", 0.009, 0.083),
                            ("ring", -0.009, 0.078), ("pinky", -0.027, 0.062)):
        root = j[hand] + 0.01 * a * along + (0, 0, z * a)
        parts.append(_limb(f"{name}{side}", root, root + length * a * along, 0.0, 0.0,
                           fwd, knots, (6, 6), (hand,)))
    root = j[wrist] + 0.03 * a * along + (0, -0.005, 0.03 * a)
    tip = root + 0.065 * a * _unit(0.55 * along + (0, -0.15, 0.82))
    parts.append(_limb(f"thumb{side}", root, tip, 0.0, 0.0, fwd,
                       _knots((0, 0.011, 0.01), (1, 0.008, 0.0075)), (6, 6), (wrist,)))
    return parts


def _leg_parts(p: dict, j: np.ndarray, side: int) -> list:
    hip, knee, ankle, foot = (1, 4, 7, 10) if side > 0 else (2, 5, 8, 11)
    g, lg = p["girth"] * p["limb_girth"], p["leg_length"]
    right = (1.0, 0, 0)
    heel = np.array([j[ankle, 0], j[foot, 1], j[ankle, 2] - 0.065 * lg])
    toe = np.array([j[foot, 0] + side * 0.01, j[foot, 1], j[foot, 2] + 0.075 * lg])
    return [
        _limb(f"thigh{side}", j[hip], j[knee], 0.08, 0.025, right,
              _knots((0, 0.09 * g, 0.09 * g), (0.25, 0.085 * g, 0.088 * g),
                     (0.75, 0.062 * g, 0.066 * g), (1, 0.05 * g, 0.052 * g)), (20, 22),
              (0, hip, knee), regress={hip: j[hip], knee: j[knee],
                                       ("h36m_hip", side): j[hip] + (0, -0.02, 0)}),
        _limb(f"shin{side}", j[knee], j[ankle], 0.03, 0.025, right,
              _knots((0, 0.05 * g, 0.052 * g), (0.3, 0.05 * g, 0.058 * g, 0, 0, -0.01),
                     (0.8, 0.034 * g, 0.036 * g), (1, 0.03 * g, 0.032 * g)), (16, 18),
              (hip, knee, ankle), regress={knee: j[knee], ankle: j[ankle]}),
        _foot(heel, toe, j[foot], (ankle, foot)),
    ]


def _foot(heel: np.ndarray, toe: np.ndarray, foot_joint: np.ndarray, joints) -> TubeSpec:
    """Foot along +z from heel to toe tip; the sole stays flat 3 cm below the axis."""
    rows = [(0.0, 0.035, 0.035), (0.35, 0.042, 0.04), (0.75, 0.048, 0.025), (1.0, 0.04, 0.018)]
    knots = _knots(*[(s, rw, rd, 0.0, rd - 0.03, 0.0) for s, rw, rd in rows])
    at = _axial(heel, toe, foot_joint)
    return TubeSpec(f"foot{int(np.sign(heel[0]))}", heel, toe, np.array([1.0, 0, 0]), knots,
                    14, 16, 0.35, joints, (at,), 0.03, {joints[1]: at})


def _neck(p: dict, j: np.ndarray) -> TubeSpec:
    g = p["girth"]
    return _limb("neck", j[12], j[15], 0.06, 0.035, (1.0, 0, 0),
                 _knots((0, 0.06 * g, 0.058 * g), (1, 0.05 * g, 0.05 * g)), (8, 24),
                 (9, 12, 15), regress={12: j[12], 15: j[15]})


def body_parts(p: dict) -> list:
    """All tube specs of a body with proportions p, scaled by p['height']."""
    j = design_joints(p)
    parts = [_torso(p, j), _head(p, j), _neck(p, j)]
    for side in (1, -1):
        parts += _arm_parts(p, j, side) + _leg_parts(p, j, side)
    scale = p["height"]
    for spec in parts:
        spec.p0, spec.p1 = spec.p0 * scale, spec.p1 * scale
        spec.knots = spec.knots * np.array([1.0, scale, scale, scale, scale, scale])
        spec.bounds = tuple(b * scale for b in spec.bounds)
        spec.blend *= scale
        spec.regress_at = {k: v * scale for k, v in spec.regress_at.items()}
    return parts


# --------------------------------------------------------------------------- assembly


@dataclass
class Layout:
    """Topology shared by all genders/shapes: part offsets, padding faces, vertex order."""
    offsets: dict          # part name -> first raw vertex index
    faces_raw: np.ndarray  # (F0, 3) faces over raw vertices
    split_faces: np.ndarray  # (P,) indices into faces_raw split at their centroid
    landmarks: dict        # smplx landmark name -> raw vertex index
    order: np.ndarray      # (6890,) raw vertex index of each final vertex


def _raw_mesh(parts: list):
    """Concatenated raw vertices (V0, 3), faces (F0, 3) and part offsets."""
    verts, faces, offsets, start = [], [], {}, 0
    for spec in parts:
        offsets[spec.name] = start
        verts.append(tube_vertices(spec))
        faces.append(tube_faces(spec.n_rings, spec.n_seg) + start)
        start += spec.num_vertices
    return np.concatenate(verts), np.concatenate(faces), offsets


def _pad_vertices(raw_verts: np.ndarray, layout: Layout) -> np.ndarray:
    """Raw vertices plus one centroid per split face -> (6890, 3) in raw+pad order."""
    tri = layout.faces_raw[layout.split_faces]
    return np.concatenate([raw_verts, raw_verts[tri].mean(axis=1)])


def _padded_faces(layout: Layout, num_raw: int) -> np.ndarray:
    """Faces after splitting each chosen face (a, b, c) into 3 around its new vertex."""
    keep = np.ones(len(layout.faces_raw), bool)
    keep[layout.split_faces] = False
    new = []
    for i, face in enumerate(layout.faces_raw[layout.split_faces]):
        m = num_raw + i
        a, b, c = face
        new += [(a, b, m), (b, c, m), (c, a, m)]
    return np.concatenate([layout.faces_raw[keep], np.asarray(new, np.int64).reshape(-1, 3)])


def _landmark_targets(parts: list, verts: np.ndarray, offsets: dict) -> dict:
    """Raw vertex index for each smplx landmark name."""
    by_name = {s.name: s for s in parts}
    found = {}
    head = by_name["head"]
    hv = slice(offsets["head"], offsets["head"] + head.num_vertices)
    center = verts[hv].mean(axis=0)
    dirs = {"nose": (0, -0.15, 1), "leye": (0.35, 0.12, 1), "reye": (-0.35, 0.12, 1),
            "lear": (1, 0, -0.05), "rear": (-1, 0, -0.05)}
    unit = verts[hv] - center
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    for name, d in dirs.items():
        found[name] = offsets["head"] + int(np.argmax(unit @ _unit(np.array(d, float))))
    for side, pre in ((1, "l"), (-1, "r")):
        for finger in ("thumb", "index", "middle", "ring", "pinky"):
            spec = by_name[f"{finger}{side}"]
            found[pre + finger] = offsets[spec.name] + spec.num_vertices - 1   # tip pole
        found.update(_foot_landmarks(by_name[f"foot{side}"], verts, offsets, side, pre.upper()))
    return found


def _foot_landmarks(spec: TubeSpec, verts, offsets, side: int, pre: str) -> dict:
    """Big toe (front, medial), small toe (front, lateral), heel (back, bottom)."""
    fv = verts[offsets[spec.name]: offsets[spec.name] + spec.num_vertices]
    lo, hi = fv.min(axis=0), fv.max(axis=0)
    inner = lo[0] if side > 0 else hi[0]
    outer = hi[0] if side > 0 else lo[0]
    targets = {f"{pre}BigToe": (0.7 * inner + 0.3 * outer, lo[1] + 0.015, hi[2] - 0.005),
               f"{pre}SmallToe": (0.2 * inner + 0.8 * outer, lo[1] + 0.012, hi[2] - 0.035),
               f"{pre}Heel": ((lo[0] + hi[0]) / 2, lo[1], lo[2])}
    return {name: offsets[spec.name] + int(np.argmin(np.linalg.norm(fv - np.array(t), axis=1)))
            for name, t in targets.items()}


def make_layout(parts: list) -> Layout:
    """Vertex order putting the smplx landmark vertices at their SMPL-H ids."""
    raw_verts, raw_faces, offsets = _raw_mesh(parts)
    num_pad = NUM_VERTICES - len(raw_verts)
    if num_pad < 0:
        raise AssertionError(f"synthetic body has {len(raw_verts)} > {NUM_VERTICES} vertices")
    torso_faces = np.flatnonzero(raw_faces[:, 0] < parts[0].num_vertices)
    stride = len(torso_faces) // max(num_pad, 1)
    split = torso_faces[stride // 2::stride][:num_pad]
    targets = _landmark_targets(parts, raw_verts, offsets)
    if len(set(targets.values())) != len(targets):
        raise AssertionError("two landmarks fell on the same vertex")
    order = list(range(NUM_VERTICES))
    position = list(range(NUM_VERTICES))                   # raw index -> final position
    for name, raw in targets.items():
        dest = LANDMARK_VERTEX_IDS[name]
        src = position[raw]
        order[src], order[dest] = order[dest], order[src]
        position[order[src]], position[order[dest]] = src, dest
    return Layout(offsets, raw_faces, split, targets, np.asarray(order))


def final_vertices(parts: list, layout: Layout) -> np.ndarray:
    """(6890, 3) vertices of a body in the final SMPL vertex order."""
    raw, _, _ = _raw_mesh(parts)
    return _pad_vertices(raw, layout)[layout.order]


def final_faces(layout: Layout) -> np.ndarray:
    """(F, 3) uint32 faces over the final vertex order."""
    inverse = np.empty(NUM_VERTICES, np.int64)
    inverse[layout.order] = np.arange(NUM_VERTICES)
    num_raw = NUM_VERTICES - len(layout.split_faces)
    return inverse[_padded_faces(layout, num_raw)].astype(np.uint32)


def _per_vertex(layout: Layout, raw_values: np.ndarray) -> np.ndarray:
    """Raw per-vertex rows -> final order, pad vertices averaging their face's rows."""
    tri = layout.faces_raw[layout.split_faces]
    padded = np.concatenate([raw_values, raw_values[tri].mean(axis=1)])
    return padded[layout.order]


# --------------------------------------------------------------------------- model arrays


def skinning_weights(parts: list, layout: Layout) -> np.ndarray:
    """(6890, 24) linear-blend-skinning weights, rows sum to 1."""
    raw_verts, _, _ = _raw_mesh(parts)
    rows = []
    for spec in parts:
        start = layout.offsets[spec.name]
        v = raw_verts[start:start + spec.num_vertices]
        w = _chain_weights((v - spec.p0) @ _frame(spec)[0], spec.bounds, spec.joints, spec.blend)
        rows.append(_torso_regions(v, w) if spec.name == "torso" else w)
    return _per_vertex(layout, np.concatenate(rows))


def _torso_regions(v: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Let the hips drive the lower torso sides and the collars the shoulder tops."""
    x, y = v[:, 0], v[:, 1]
    side = np.abs(x)
    hip = 0.6 * (1 - _smoothstep(-0.12, 0.0, y)) * _smoothstep(0.02, 0.10, side)
    collar = 0.7 * _smoothstep(0.34, 0.44, y) * _smoothstep(0.06, 0.16, side)
    extra = hip + collar
    out = w * (1 - extra)[:, None]
    left = x > 0
    out[:, 1] += hip * left
    out[:, 2] += hip * ~left
    out[:, 13] += collar * left
    out[:, 14] += collar * ~left
    return out


def _ring_row(spec: TubeSpec, offset: int, axial: float) -> dict:
    """Weights {raw vertex: w} averaging the two rings around an axial position."""
    length = np.linalg.norm(spec.p1 - spec.p0)
    s_rings, _ = _ring_params(spec)
    s = np.clip(axial / length, s_rings[0], s_rings[-1])
    k = min(int(np.searchsorted(s_rings, s, side="right")) - 1, spec.n_rings - 2)
    alpha = (s - s_rings[k]) / (s_rings[k + 1] - s_rings[k])
    row = {}
    for ring, wt in ((k, 1 - alpha), (k + 1, alpha)):
        first = offset + 1 + ring * spec.n_seg
        for i in range(first, first + spec.n_seg):
            row[i] = row.get(i, 0.0) + wt / spec.n_seg
    return row


def _regression_rows(parts: list, layout: Layout) -> dict:
    """{joint key: [{raw vertex: w}, ...]} for every regress_at entry of every part."""
    rows = {}
    for spec in parts:
        for key, axial in spec.regress_at.items():
            rows.setdefault(key, []).append(_ring_row(spec, layout.offsets[spec.name], axial))
    return rows


def _mix(rows: list) -> dict:
    """Equal-weight average of several {vertex: w} rows."""
    out = {}
    for row in rows:
        for i, w in row.items():
            out[i] = out.get(i, 0.0) + w / len(rows)
    return out


def _to_matrix(rows: list, layout: Layout) -> np.ndarray:
    """Rows of {raw vertex: w} -> dense (len(rows), 6890) over the final vertex order."""
    num_raw = NUM_VERTICES - len(layout.split_faces)
    raw = np.zeros((len(rows), num_raw))
    for r, row in enumerate(rows):
        for i, w in row.items():
            raw[r, i] += w
    padded = np.concatenate([raw, np.zeros((len(rows), len(layout.split_faces)))], axis=1)
    return padded[:, layout.order]


def smpl_joint_regressor(parts: list, layout: Layout) -> scipy.sparse.csc_matrix:
    """(24, 6890) sparse regressor: each joint is a ring average around it."""
    rows = _regression_rows(parts, layout)
    return scipy.sparse.csc_matrix(_to_matrix([_mix(rows[j]) for j in range(NUM_JOINTS)], layout))


def h36m_joint_regressor(parts: list, layout: Layout) -> np.ndarray:
    """(17, 6890) regressor in SPIN's H36M order, rows sum to 1."""
    rows = _regression_rows(parts, layout)
    head = next(s for s in parts if s.name == "head")
    top = layout.offsets["head"] + head.num_vertices - 1
    top_ring = _ring_row(head, layout.offsets["head"], np.linalg.norm(head.p1 - head.p0))
    nose = {layout.landmarks["nose"]: 1.0}
    lhip, rhip = _mix(rows[("h36m_hip", 1)]), _mix(rows[("h36m_hip", -1)])
    table = [
        _mix([lhip, rhip]), lhip, _mix(rows[4]), _mix(rows[7]),
        rhip, _mix(rows[5]), _mix(rows[8]), _mix(rows["h36m_spine"]),
        _mix(rows["h36m_thorax"]), _mix([_mix(rows["h36m_neck_nose"])] * 2 + [nose]),
        _mix([{top: 1.0}, top_ring]),
        _mix(rows[16]), _mix(rows[18]), _mix(rows[20]),
        _mix(rows[17]), _mix(rows[19]), _mix(rows[21]),
    ]
    return _to_matrix(table, layout)


def _shifted(params: dict, name: str, step: float) -> dict:
    """params with proportion `name` moved by `step` (height drags HEIGHT_COUPLING along)."""
    coupled = HEIGHT_COUPLING if name == "height" else {}
    moved = {**params, name: params[name] + step}
    for other, per_unit in coupled.items():
        moved[other] = params[other] + per_unit * step
    return moved


def shape_blend_shapes(params: dict, layout: Layout) -> np.ndarray:
    """(6890, 3, 10): central differences of the mesh w.r.t. each BETA_PARAMS proportion
    (the first with HEIGHT_COUPLING), Gram-Schmidt orthogonalised in order and rescaled
    to their own norms."""
    dirs = []
    for name, step in BETA_PARAMS:
        plus = final_vertices(body_parts(_shifted(params, name, step)), layout)
        minus = final_vertices(body_parts(_shifted(params, name, -step)), layout)
        dirs.append(((plus - minus) / 2.0).reshape(-1))
    basis = []
    for d in dirs:
        norm = np.linalg.norm(d)
        for b in basis:
            d = d - np.dot(d, b) / np.dot(b, b) * b
        basis.append(d * norm / np.linalg.norm(d))
    return np.stack(basis, axis=1).reshape(NUM_VERTICES, 3, NUM_BETAS)


def pose_blend_shapes(vertices: np.ndarray, weights: np.ndarray, joints: np.ndarray,
                      rng: np.random.Generator) -> np.ndarray:
    """(6890, 3, 207) small seeded correctives around each joint (joints 1..23).

    Active where a joint and its parent share skinning weight; an offset per entry of
    (R_j - I): a seeded constant direction plus a seeded radial bulge.
    """
    posedirs = np.zeros((NUM_VERTICES, 3, 9 * (NUM_JOINTS - 1)))
    for j in range(1, NUM_JOINTS):
        mask = np.clip(4.0 * weights[:, j] * weights[:, SMPL_PARENTS[j]], 0.0, 1.0)
        active = np.flatnonzero(mask > 1e-4)
        const = rng.normal(0.0, 0.004, size=(3, 9))
        bulge = rng.normal(0.0, 0.006, size=9)
        radial = vertices[active] - joints[j]
        radial /= np.maximum(np.linalg.norm(radial, axis=1, keepdims=True), 1e-9)
        block = const[None] + radial[:, :, None] * bulge[None, None, :]
        posedirs[active, :, 9 * (j - 1): 9 * j] = mask[active, None, None] * block
    return posedirs


def _kintree_table() -> np.ndarray:
    parents = np.array(SMPL_PARENTS, dtype=np.int64)
    parents[0] = 4294967295                       # as in the official files (uint32 -1)
    return np.stack([parents, np.arange(NUM_JOINTS, dtype=np.int64)])


def _symmetry_index(vertices: np.ndarray) -> np.ndarray:
    """(6890,) index of each vertex's mirror (x -> -x) partner."""
    _, idx = cKDTree(vertices).query(vertices * np.array([-1.0, 1.0, 1.0]))
    return idx.astype(np.int64)


def _apply_bust(vertices: np.ndarray, layout: Layout, parts: list, bust: float) -> np.ndarray:
    """Forward bulge on the chest front for the female/neutral variants."""
    torso = parts[0]
    raw_index = layout.order
    num_raw = NUM_VERTICES - len(layout.split_faces)
    in_torso = (raw_index < torso.num_vertices) | (raw_index >= num_raw)
    v = vertices
    chest_y = 0.33 * torso.p1[1] / 0.56
    front = np.clip((v[:, 2] - 0.03) / 0.08, 0.0, 1.0)
    amount = (bust * 0.025 * front * np.exp(-((v[:, 1] - chest_y) / 0.05) ** 2)
              * np.exp(-((np.abs(v[:, 0]) - 0.085) / 0.045) ** 2) * in_torso)
    out = v.copy()
    out[:, 2] += amount
    return out


def gender_model(gender: str, layout: Layout, weights, j_regressor, seed: int) -> dict:
    """The SMPL pickle dict of one gender."""
    params = GENDER_PARAMS[gender]
    parts = body_parts(params)
    verts = _apply_bust(final_vertices(parts, layout), layout, parts, params["bust"])
    joints = np.asarray(j_regressor @ verts)
    rng = np.random.default_rng([seed, GENDERS.index(gender)])
    return {
        "v_template": verts,
        "f": final_faces(layout),
        "weights": weights,
        "kintree_table": _kintree_table(),
        "J_regressor": j_regressor,
        "J": joints,
        "shapedirs": shape_blend_shapes(params, layout),
        "posedirs": pose_blend_shapes(verts, weights, joints, rng).astype(np.float32),
        "vert_sym_idxs": _symmetry_index(verts),
        "bs_style": "lbs",
        "bs_type": "lrotmin",
        "raytrain_synthetic": {"format_version": FILE_FORMAT_VERSION, "seed": seed,
                               "gender": gender},
    }


def mean_params() -> dict:
    """Arrays of smpl_mean_params.npz: pose (144,) SPIN 6D layout, shape (10,), cam (3,)."""
    aa = np.zeros((NUM_JOINTS, 3))
    for j, v in MEAN_POSE_AXIS_ANGLE.items():
        aa[j] = v
    rot = np.stack([_axis_angle_matrix(a) for a in aa])                 # (24, 3, 3)
    pose6d = rot[:, :, :2].reshape(-1)                          # rows of the 3x2 block
    return {"pose": pose6d.astype(np.float32), "shape": np.zeros(NUM_BETAS, np.float32),
            "cam": np.asarray(MEAN_CAM, np.float32)}


def write_synthetic_body_model(out_dir, seed: int = 0) -> Path:
    """Write the synthetic SMPL-format model files into out_dir (created) and return it.

    Files: SMPL_{NEUTRAL,MALE,FEMALE}.pkl, J_regressor_h36m.npy, smpl_mean_params.npz.
    Same seed -> identical arrays.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parts = body_parts(GENDER_PARAMS["neutral"])
    layout = make_layout(parts)
    weights = skinning_weights(parts, layout)
    j_regressor = smpl_joint_regressor(parts, layout)
    for gender in GENDERS:
        model = gender_model(gender, layout, weights, j_regressor, seed)
        _write(out / f"SMPL_{gender.upper()}.pkl", lambda fh, model=model: pickle.dump(model, fh, protocol=4))
    h36m = h36m_joint_regressor(parts, layout)
    _write(out / "J_regressor_h36m.npy", lambda fh: np.save(fh, h36m))
    _write(out / "smpl_mean_params.npz", lambda fh: np.savez(fh, **mean_params()))
    return out


def _write(path: Path, writer) -> None:
    """Write a file through writer(file handle) and flush it to disk."""
    with open(path, "wb") as fh:
        writer(fh)
        fh.flush()
        os.fsync(fh.fileno())


def _axis_angle_matrix(aa: np.ndarray) -> np.ndarray:
    """(3,) axis-angle -> (3, 3) rotation matrix."""
    return cv2.Rodrigues(np.asarray(aa, np.float64).reshape(3, 1))[0]


# --------------------------------------------------------------------------- the default model

SYNTHETIC_SEED = 0


def default_body_model_dir() -> Path:
    """The synthetic model's directory, `$RAYTRAIN_HOME/body/synthetic-v2-seed0` (generator
    version, seed), generated on first use (safe with concurrent callers: temp dir + atomic
    rename); a model of another generator version is never reused."""
    final = raytrain_home() / "body" / f"synthetic-v{FILE_FORMAT_VERSION}-seed{SYNTHETIC_SEED}"
    if is_complete_body_model_dir(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        write_synthetic_body_model(tmp, seed=SYNTHETIC_SEED)
        try:
            os.rename(tmp, final)
        except OSError:
            if not is_complete_body_model_dir(final):  # not a concurrent winner: a stale partial dir
                raise BodyModelError(f"{final}: exists but is not a complete body model "
                                     "directory; remove it to regenerate") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def with_default_body_model(cfg):
    """`cfg` with `model.smpl_dir` set to the synthetic model's directory when it is unset
    (the entry points call this; the library never makes a body model on its own)."""
    if cfg.model.smpl_dir is None:
        cfg.model.smpl_dir = str(default_body_model_dir())
    return cfg
