"""Joint sets, kinematic tree and flip permutations (see docs/CONVENTIONS.md).

Left/right are the person's own sides. In the SMPL rest frame (y up, facing +z) the
person's left side is +x.
"""
import numpy as np

SMPL_JOINT_NAMES = (
    "pelvis", "left_hip", "right_hip", "spine1", "left_knee", "right_knee",
    "spine2", "left_ankle", "right_ankle", "spine3", "left_foot", "right_foot",
    "neck", "left_collar", "right_collar", "head", "left_shoulder", "right_shoulder",
    "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hand", "right_hand",
)

# Parent of each SMPL joint (-1 for the root), the SMPL kinematic tree.
SMPL_PARENTS = (-1, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 12, 13, 14, 16, 17, 18, 19, 20, 21)

# Left <-> right swap of the 24 SMPL joints.
SMPL_JOINT_FLIP_PERM = (0, 2, 1, 3, 5, 4, 6, 8, 7, 9, 11, 10, 12, 14, 13, 15,
                        17, 16, 19, 18, 21, 20, 23, 22)

# Permutation of the 72 axis-angle entries for a horizontal flip (as SPIN does). After
# permuting, the y and z components of every axis-angle are negated (see flip_smpl_pose).
SMPL_POSE_FLIP_PERM = tuple(3 * j + k for j in SMPL_JOINT_FLIP_PERM for k in range(3))

# The 17 joints of SPIN's J_regressor_h36m.npy, in its row order.
H36M_JOINT_NAMES = (
    "pelvis", "lhip", "lknee", "lankle", "rhip", "rknee", "rankle", "spine", "thorax",
    "neck_nose", "head_top", "lshoulder", "lelbow", "lwrist", "rshoulder", "relbow", "rwrist",
)
H36M_FLIP_PERM = (0, 4, 5, 6, 1, 2, 3, 7, 8, 9, 10, 14, 15, 16, 11, 12, 13)

# The 14 LSP joints used by the 3DPW / H36M protocols, as rows of the H36M regressor.
H36M_TO_J14 = (6, 5, 4, 1, 2, 3, 16, 15, 14, 11, 12, 13, 8, 10)
J14_NAMES = (
    "rankle", "rknee", "rhip", "lhip", "lknee", "lankle", "rwrist", "relbow",
    "rshoulder", "lshoulder", "lelbow", "lwrist", "neck", "head_top",
)

# J24: the canonical 2D/3D keypoint set of shards (SPIN's "GT joints" order).
J24_NAMES = J14_NAMES + (
    "pelvis", "thorax", "spine", "jaw", "head", "nose", "leye", "reye", "lear", "rear",
)
J24_FLIP_PERM = (5, 4, 3, 2, 1, 0, 11, 10, 9, 8, 7, 6, 12, 13, 14, 15, 16, 17, 18, 19,
                 21, 20, 23, 22)


def flip_smpl_pose(pose):
    """Horizontally flip SMPL axis-angle poses.

    pose: (..., 72) numpy array or torch tensor -> same type and shape. Applying it twice
    gives the input back.
    """
    flipped = pose[..., list(SMPL_POSE_FLIP_PERM)]
    sign = np.tile(np.array([1.0, -1.0, -1.0]), 24)
    if isinstance(flipped, np.ndarray):
        return flipped * sign.astype(flipped.dtype)
    return flipped * flipped.new_tensor(sign)

#: OpenPose-18 (COCO-18) index for each J24 joint that has one (docs/CONVENTIONS.md).
J24_TO_OPENPOSE18 = {0: 10, 1: 9, 2: 8, 3: 11, 4: 12, 5: 13, 6: 4, 7: 3, 8: 2, 9: 5,
                     10: 6, 11: 7, 12: 1, 19: 0, 20: 15, 21: 14, 22: 17, 23: 16}
