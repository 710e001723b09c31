"""CLIFF cameras: box descriptor, crop <-> full-image cameras, full-perspective projection.

Boxes are (cx, cy, b) in full-image pixels; image sizes (W, H); focal lengths in pixels.
Crop camera (s, tx, ty) is weak perspective in the box's normalised frame; the full
camera (tx, ty, tz) is a translation in the camera frame (docs/method.md §4).
"""
import torch


def default_focal(image_size: torch.Tensor) -> torch.Tensor:
    """CLIFF's focal length when none is known: the image diagonal. (..., 2) -> (...)."""
    image_size = torch.as_tensor(image_size)
    return image_size.to(torch.get_default_dtype() if not image_size.is_floating_point()
                         else image_size.dtype).norm(dim=-1)


def _centre_offset(boxes, image_size):
    """Box centre relative to the image centre: (..., 2)."""
    return boxes[..., :2] - image_size[..., :2].to(boxes.dtype) / 2


def bbox_info(boxes: torch.Tensor, image_size: torch.Tensor, focal: torch.Tensor) -> torch.Tensor:
    """CLIFF's normalised box descriptor (docs/method.md §5). boxes (..., 3) -> (..., 3)."""
    focal = torch.as_tensor(focal, dtype=boxes.dtype, device=boxes.device)[..., None]
    centre = _centre_offset(boxes, image_size) / focal * 2.8
    size = (boxes[..., 2:3] - 0.24 * focal) / (0.06 * focal)
    return torch.cat([centre, size], dim=-1)


def cam_crop_to_full(cam: torch.Tensor, boxes: torch.Tensor, image_size: torch.Tensor,
                     focal: torch.Tensor, eps: float = 1e-9) -> torch.Tensor:
    """Crop camera (s, tx, ty) -> full camera (tx, ty, tz). All (..., 3); focal (...)."""
    focal = torch.as_tensor(focal, dtype=cam.dtype, device=cam.device)
    bs = boxes[..., 2] * cam[..., 0]
    bs = torch.where(bs.abs() < eps, torch.full_like(bs, eps), bs)
    centre = _centre_offset(boxes, image_size).to(cam.dtype)
    tx = cam[..., 1] + 2 * centre[..., 0] / bs
    ty = cam[..., 2] + 2 * centre[..., 1] / bs
    tz = 2 * focal / bs
    return torch.stack([tx, ty, tz], dim=-1)


def cam_full_to_crop(cam_full: torch.Tensor, boxes: torch.Tensor, image_size: torch.Tensor,
                     focal: torch.Tensor) -> torch.Tensor:
    """Inverse of `cam_crop_to_full`: full camera (tx, ty, tz) -> crop camera (s, tx, ty)."""
    focal = torch.as_tensor(focal, dtype=cam_full.dtype, device=cam_full.device)
    s = 2 * focal / (boxes[..., 2] * cam_full[..., 2])
    bs = boxes[..., 2] * s
    centre = _centre_offset(boxes, image_size).to(cam_full.dtype)
    tx = cam_full[..., 0] - 2 * centre[..., 0] / bs
    ty = cam_full[..., 1] - 2 * centre[..., 1] / bs
    return torch.stack([s, tx, ty], dim=-1)


def perspective_projection(points: torch.Tensor, translation: torch.Tensor, focal: torch.Tensor,
                           image_size: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Full-perspective projection with the principal point at the image centre.

    points (..., J, 3) in the body frame, translation (..., 3), focal (...), image_size (..., 2)
    -> (..., J, 2) in full-image pixels.
    """
    focal = torch.as_tensor(focal, dtype=points.dtype, device=points.device)
    cam_points = points + translation[..., None, :]
    depth = cam_points[..., 2:3].clamp(min=eps)
    centre = image_size[..., None, :].to(points.dtype) / 2
    return cam_points[..., :2] / depth * focal[..., None, None] + centre


def to_roi_coords(pixels: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Full-image pixels (..., J, 2) -> normalised coordinates of each box (..., J, 2) in [-1, 1]."""
    return (pixels - boxes[..., None, :2]) / (boxes[..., None, 2:3] / 2)
