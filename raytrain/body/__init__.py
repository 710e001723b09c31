"""Body model: SMPL via smplx, joint sets."""
from .joints import (
                     H36M_FLIP_PERM,
                     H36M_JOINT_NAMES,
                     H36M_TO_J14,
                     J14_NAMES,
                     J24_FLIP_PERM,
                     J24_NAMES,
                     SMPL_JOINT_FLIP_PERM,
                     SMPL_JOINT_NAMES,
                     SMPL_PARENTS,
                     SMPL_POSE_FLIP_PERM,
                     flip_smpl_pose,
)
from .model import BodyModel, BodyModelError, BodyOutput, ensure_body_model_dir, load_body_model, load_mean_params

__all__ = [
    "BodyModel", "BodyModelError", "BodyOutput", "ensure_body_model_dir", "load_body_model",
    "load_mean_params", "SMPL_JOINT_NAMES", "SMPL_PARENTS",
    "SMPL_JOINT_FLIP_PERM", "SMPL_POSE_FLIP_PERM", "H36M_JOINT_NAMES", "H36M_FLIP_PERM",
    "H36M_TO_J14", "J14_NAMES", "J24_NAMES", "J24_FLIP_PERM", "flip_smpl_pose",
]
