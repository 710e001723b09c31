"""Predicted meshes drawn over the full image (``--render``): JPEG per image, MP4 per video.

Each person's vertices are projected with the full-perspective camera of its RoI 0
(``cam_full``, the focal used for the prediction, principal point at the image centre:
``eval.report.project_vertices``) and their edges drawn with ``eval.report.draw_meshes``,
the drawing of the evaluation overlays. The person's box is outlined, its index written
beside it.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from ..eval.report import draw_meshes, project_vertices

MESH_COLOUR = (40, 140, 255)  # BGR orange: stands out on sky, grass and skin alike
BOX_COLOUR = (60, 200, 60)    # BGR


def canvas_of(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> the BGR canvas persons are drawn on."""
    return cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR)


def draw_persons(canvas: np.ndarray, persons: list[dict], faces: np.ndarray | None) -> np.ndarray:
    """Persons ({vertices (V, 3), cam_full (3,), focal, bbox, person}) drawn over a BGR
    canvas (H, W, 3) -> the new canvas. Called once per batch of persons, so a picture's
    persons never need to be held together."""
    height, width = canvas.shape[:2]
    size = np.array([width, height], np.float64)
    # far persons first, so the nearer meshes are drawn over them
    order = sorted(persons, key=lambda p: -float(p["cam_full"][2]))
    meshes = [project_vertices(p["vertices"], p["cam_full"], p["focal"], size) for p in order]
    if meshes:
        canvas = draw_meshes(canvas, meshes, faces, colour=MESH_COLOUR)
    thickness = max(1, int(round(max(height, width) / 400)))
    reach = 4 * max(height, width)   # admitted boxes lie within; OpenCV needs int32 corners
    for p in persons:
        x, y, w, h = np.clip(np.nan_to_num(np.asarray(p["bbox"], np.float64)), -reach, reach)
        x0, y0 = int(round(x)), int(round(y))
        x1, y1 = int(round(np.clip(x + w, -reach, reach))), int(round(np.clip(y + h, -reach, reach)))
        cv2.rectangle(canvas, (x0, y0), (x1, y1), BOX_COLOUR, thickness, cv2.LINE_AA)
        cv2.putText(canvas, str(p["person"]), (x0 + 2, y0 + 14 * thickness),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.45 * thickness, BOX_COLOUR, thickness, cv2.LINE_AA)
    return canvas


def render_frame(rgb: np.ndarray, persons: list[dict], faces: np.ndarray | None) -> np.ndarray:
    """(H, W, 3) uint8 RGB + persons -> (H, W, 3) uint8 BGR with the meshes over the picture."""
    return draw_persons(canvas_of(rgb), persons, faces)


def write_image(path: Path, bgr: np.ndarray, quality: int = 90) -> str:
    """A JPEG at ``path`` (its folder exists: the output rule made it)."""
    if not cv2.imwrite(str(path), bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)]):
        raise OSError(f"could not write {path}")
    return str(path)


class VideoOut:
    """An MP4 written frame by frame with OpenCV (``mp4v``), opened at the first frame."""

    def __init__(self, path: Path, fps: float):
        self.path, self.fps, self.writer = Path(path), float(fps), None

    def write(self, bgr: np.ndarray) -> None:
        if self.writer is None:
            height, width = bgr.shape[:2]
            self.writer = cv2.VideoWriter(str(self.path), cv2.VideoWriter_fourcc(*"mp4v"), self.fps,
                                          (width, height))
            if not self.writer.isOpened():
                raise OSError(f"OpenCV cannot write {self.path} (mp4v)")
        self.writer.write(bgr)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.release()
            self.writer = None
