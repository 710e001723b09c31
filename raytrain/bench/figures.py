"""The README's method figure: the paper's five RoIs drawn on a synthetic person.

    python -m raytrain.bench.figures docs/rois.png
"""
import sys

import cv2
import torch

from ..geometry import PAPER_OFFSETS, PAPER_SCALES, multi_roi_boxes

ROI_COLOURS = [(255, 255, 255), (230, 60, 60), (60, 200, 60), (70, 110, 255), (250, 200, 40)]


def roi_figure(path: str, seed: int = 3, index: int = 0):
    """Render one synthetic person in its full frame and draw RoIs 0..4 with their labels."""
    from ..synthetic.people import SyntheticConfig, SyntheticGenerator
    generator = SyntheticGenerator(SyntheticConfig(storage="full", image_sizes=((960, 540),),
                                                   box_fraction=(0.6, 0.7)))
    raw = generator.samples(seed, [index])[0]
    image = raw["image"].copy()
    box = torch.tensor([raw["meta"]["box"]], dtype=torch.float64)
    rois = multi_roi_boxes(box, PAPER_OFFSETS, PAPER_SCALES)[0].numpy()
    labels = ["0: box", "1: +0.1b x, 1.5", "2: -0.1b x, 1.25", "3: +0.1b y, 0.8", "4: -0.1b y, 0.65"]
    for (cx, cy, b), colour in zip(rois, ROI_COLOURS):
        p0 = (int(round(cx - b / 2)), int(round(cy - b / 2)))
        p1 = (int(round(cx + b / 2)), int(round(cy + b / 2)))
        cv2.rectangle(image, p0, p1, colour, 2, cv2.LINE_AA)
    for k, (colour, label) in enumerate(zip(ROI_COLOURS, labels)):
        cv2.putText(image, label, (12, 28 + 26 * k), cv2.FONT_HERSHEY_SIMPLEX, 0.7, (0, 0, 0), 4, cv2.LINE_AA)
        cv2.putText(image, label, (12, 28 + 26 * k), cv2.FONT_HERSHEY_SIMPLEX, 0.7, colour, 2, cv2.LINE_AA)
    cv2.imwrite(path, cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    return path


if __name__ == "__main__":
    print(roi_figure(sys.argv[1] if len(sys.argv) > 1 else "docs/rois.png"))
