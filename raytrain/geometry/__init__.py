"""Geometry: RoI schedules, CLIFF cameras and box descriptor, projection, rotations."""
from .camera import bbox_info, cam_crop_to_full, cam_full_to_crop, default_focal, perspective_projection, to_roi_coords
from .rois import (
                     FIXED_DIRECTIONS,
                     MAX_ROIS,
                     PAPER_OFFSETS,
                     PAPER_SCALES,
                     SCHEDULES,
                     FixedSchedule,
                     RandomSchedule,
                     build_schedule,
                     multi_roi_boxes,
                     schedule_from_config,
                     schedule_names,
)
from .rotation import axis_angle_to_rotmat, rot6d_to_rotmat, rotmat_to_axis_angle, rotmat_to_quaternion, rotmat_to_rot6d
