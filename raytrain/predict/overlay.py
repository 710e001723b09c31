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


def render_frame(rgb: np.ndarray, persons: list[dict], faces: np.ndarray | None) -> np.ndarray:
    """(H, W, 3) uint8 RGB + persons ({vertices (V, 3), cam_full (3,), focal, bbox,
    person}) -> (H, W, 3) uint8 BGR with the meshes over the picture."""
    canvas = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR)
    size = np.array([rgb.shape[1], rgb.shape[0]], np.float64)
    # far persons first, so the nearer meshes are drawn over them
    order = sorted(persons, key=lambda p: -float(p["cam_full"][2]))
    meshes = [project_vertices(p["vertices"], p["cam_full"], p["focal"], size) for p in order]
    if meshes:
        canvas = draw_meshes(canvas, meshes, faces, colour=MESH_COLOUR)
    thickness = max(1, int(round(max(rgb.shape[:2]) / 400)))
    for p in persons:
        x, y, w, h = (float(v) for v in p["bbox"])
        cv2.rectangle(canvas, (int(round(x)), int(round(y))), (int(round(x + w)), int(round(y + h))),
                      BOX_COLOUR, thickness, cv2.LINE_AA)
        cv2.putText(canvas, str(p["person"]), (int(round(x)) + 2, int(round(y)) + 14 * thickness),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.45 * thickness, BOX_COLOUR, thickness, cv2.LINE_AA)
    return canvas


def write_image(path: Path, bgr: np.ndarray, quality: int = 90) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)]):
        raise OSError(f"could not write {path}")
    return str(path)


class VideoOut:
    """An MP4 written frame by frame with OpenCV (``mp4v``), opened at the first frame."""

    def __init__(self, path: Path, fps: float):
        self.path, self.fps, self.writer = Path(path), float(fps), None

    def write(self, bgr: np.ndarray) -> None:
        if self.writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
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
