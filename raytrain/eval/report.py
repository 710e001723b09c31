"""Evaluation report: metrics.json, report.md, a per-joint bar chart and mesh overlays.

    write_report(out_dir, metrics, evaluation)      # one checkpoint (raytrain.eval.run)
    write_summary_report(out_dir, results)          # several checkpoints (--top K)

Plots use matplotlib's object API on the Agg canvas (no pyplot, no global backend
switch). Overlays project the predicted mesh with the full-perspective camera of RoI 0
(`cam_full`, principal point at the image centre, CONVENTIONS.md) into full-image
pixels, map them into RoI 0's crop with the cropper's own transform, and draw the mesh
edges over the (upscaled) crop; ground-truth 2D keypoints are drawn as green dots.
"""
import json
import re
from pathlib import Path

import cv2
import numpy as np
import torch

from ..outputs import Output, write_text

OVERLAY_SIZE = 320
#: What a report writes into its folder (besides one sub-folder per checkpoint of --top K).
REPORT_FILES = ("metrics.json", "report.md", "per_joint.png", "overlays", "summary.json")


# ----------------------------------------------------------------------------- files


def write_report(out_dir, metrics: dict, evaluation=None) -> dict[str, str]:
    """Write metrics.json, per_joint.png, overlays/*.png and report.md; return their paths."""
    out = Output(Path(out_dir), None)    # claimed by the caller (outputs.claim_output)
    out.root.mkdir(parents=True, exist_ok=True)
    out.write_text("metrics.json", json.dumps(metrics, indent=2, default=_json_default))
    with out.atomic("per_joint.png") as tmp:
        plot_per_joint(metrics["per_joint"], tmp)
    overlays = []
    if evaluation is not None and evaluation.overlay_samples:
        for index, sample in enumerate(evaluation.overlay_samples):
            name = f"overlays/{index:02d}_{_safe(sample['key'])}.png"
            with out.atomic(name) as tmp:
                draw_overlay(sample, evaluation.faces, tmp)
            overlays.append((name, sample))
    out.write_text("report.md", report_markdown(metrics, overlays))
    return {k: str(out.root / name) for k, name in
            (("metrics", "metrics.json"), ("per_joint", "per_joint.png"), ("report", "report.md"))}


def write_summary_report(out_dir, results: list[dict]) -> dict[str, str]:
    """Several evaluated checkpoints: summary.json and a ranking table in report.md."""
    out = Path(out_dir)
    rows = [{"rank": i + 1, "checkpoint": r["checkpoint"], "out": r.get("out"),
             "stored_val_mpjpe": r.get("stored_validation", {}).get("val_mpjpe"), **r["overall"]}
            for i, r in enumerate(results)]
    write_text(out / "summary.json", json.dumps({"evaluations": rows}, indent=2, default=_json_default))
    lines = [f"# Evaluation of the top {len(results)} checkpoints", "",
             f"Data: `{results[0]['data']}`. {results[0]['protocol']['note']}", "",
             "| rank | checkpoint | MPJPE | PA-MPJPE | PVE | samples | stored val_mpjpe | report |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        rel = _relative(row["out"], out)
        lines.append(f"| {row['rank']} | `{row['checkpoint']}` | {row['mpjpe']:.2f} | {row['pa_mpjpe']:.2f} "
                     f"| {row['pve']:.2f} | {row['num_samples']} | {_fmt(row['stored_val_mpjpe'])} "
                     f"| [{rel}/report.md]({rel}/report.md) |")
    write_text(out / "report.md", "\n".join(lines) + "\n")
    return {"summary": str(out / "summary.json"), "report": str(out / "report.md")}


# ----------------------------------------------------------------------------- markdown


def report_markdown(metrics: dict, overlays=()) -> str:
    o = metrics["overall"]
    gt = ("the gendered body models (per-sample gender from the data)" if metrics.get("gendered_gt")
          else "the neutral body model (the batches carry no per-sample gender)")
    lines = [
        f"# Evaluation: {metrics.get('protocol', {}).get('name', 'mesh')} protocol", "",
        f"- data: `{metrics['data']}` ({o['num_samples']} samples, "
        f"{len(metrics['per_sequence'])} sequences)",
        f"- checkpoint: `{metrics['checkpoint']}` (step {metrics.get('step')}; backbone "
        f"`{metrics.get('backbone')}`, M = {metrics.get('num_rois')} RoIs)",
        f"- training config: {metrics.get('config_source')}",
        f"- ground-truth meshes: {gt}",
        f"- protocol: {metrics['protocol']['note']}", "",
        "## Overall (mm)", "",
        "| MPJPE | PA-MPJPE | PVE | camera translation error | constant camera | scale ratio | samples |",
        "|---|---|---|---|---|---|---|",
        f"| {o['mpjpe']:.2f} | {o['pa_mpjpe']:.2f} | {o['pve']:.2f} | {_fmt(o.get('cam_err'))} "
        f"| {_fmt(o.get('const_cam_err'))} | {_fmt(o.get('scale_ratio'), 3)} | {o['num_samples']} |", "",
    ]
    if "cam_err" in o:
        lines += ["Camera baselines: the constant camera predicts the median crop camera (s, tx, ty) of "
                  "the evaluated set for every person (a network's camera error is judged against it); "
                  "the scale ratio is the predicted over the true crop-camera scale (1: unbiased, below 1: "
                  "people placed too far away).", ""]
    skipped = metrics.get("skipped") or {}
    if skipped.get("total"):
        reasons = ", ".join(f"{reason}: {n}" for reason, n in sorted(skipped["by_reason"].items()))
        lines += [f"Skipped {skipped['total']} bad sample(s) of the data, not scored ({reasons}); "
                  "every other sample is scored once.", ""]
    stored = metrics.get("stored_validation") or {}
    if "val_mpjpe" in stored:
        lines += [f"Validation recorded with this checkpoint during training: MPJPE "
                  f"{stored['val_mpjpe']:.2f} mm, PA-MPJPE {_fmt(stored.get('val_pa_mpjpe'))} mm, "
                  f"PVE {_fmt(stored.get('val_pve'))} mm over {int(stored.get('val_samples', 0))} "
                  f"samples (difference to this evaluation: {stored['val_mpjpe_difference']:+.3f} mm; "
                  "the two coincide when `--data` is the training run's validation set).", ""]
    lines += ["## Per joint (mm)", "",
              "Pelvis-aligned error of each of the 14 LSP joints, averaged over samples.", "",
              "![per-joint MPJPE](per_joint.png)", "",
              "| joint | MPJPE |", "|---|---|"]
    lines += [f"| {name} | {value:.2f} |" for name, value in metrics["per_joint"].items()]
    lines += ["", "## Per sequence (mm)", "",
              "| sequence | samples | MPJPE | PA-MPJPE | PVE |", "|---|---|---|---|---|"]
    for name, s in metrics["per_sequence"].items():
        lines.append(f"| {name} | {s['num_samples']} | {s['mpjpe']:.2f} | {s['pa_mpjpe']:.2f} | {s['pve']:.2f} |")
    if overlays:
        lines += ["", "## Overlays", "",
                  "Predicted mesh projected with the full camera of RoI 0 onto RoI 0's crop "
                  "(green dots: ground-truth 2D keypoints).", ""]
        for rel, sample in overlays:
            lines += [f"`{sample['key']}`: MPJPE {sample['mpjpe']:.1f} mm, PA-MPJPE "
                      f"{sample['pa_mpjpe']:.1f} mm", "", f"![{sample['key']}]({rel})", ""]
    return "\n".join(lines).rstrip() + "\n"


# ----------------------------------------------------------------------------- plots


def plot_per_joint(per_joint: dict[str, float], path) -> str:
    """Bar chart of the per-joint MPJPE (mm) -> PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    names, values = list(per_joint), [float(v) for v in per_joint.values()]
    fig = Figure(figsize=(8, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    bars = ax.bar(range(len(names)), values, color="#4c72b0")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=45, ha="right")
    ax.set_ylabel("MPJPE (mm)")
    mean = float(np.mean(values)) if values else 0.0
    ax.axhline(mean, color="#c44e52", linestyle="--", linewidth=1, label=f"mean {mean:.1f} mm")
    ax.legend(loc="upper left", frameon=False)
    ax.set_title("Per-joint error (14 LSP joints, pelvis-aligned)")
    for bar, value in zip(bars, values):
        ax.annotate(f"{value:.0f}", (bar.get_x() + bar.get_width() / 2, value), ha="center",
                    va="bottom", fontsize=7)
    fig.tight_layout()
    fig.savefig(str(path))
    return str(path)


def project_vertices(vertices: np.ndarray, cam_full: np.ndarray, focal: float,
                     image_size: np.ndarray) -> np.ndarray:
    """(V, 3) body frame + translation (3,) -> (V, 2) full-image px (principal point at centre)."""
    from ..geometry import perspective_projection
    pixels = perspective_projection(torch.as_tensor(np.asarray(vertices, np.float64))[None],
                                    torch.as_tensor(np.asarray(cam_full, np.float64))[None],
                                    torch.tensor([float(focal)], dtype=torch.float64),
                                    torch.as_tensor(np.asarray(image_size, np.float64))[None])
    return pixels[0].numpy()


def full_to_crop(points: np.ndarray, box: np.ndarray, crop_size: int) -> np.ndarray:
    """Full-image px (K, 2) -> px of the crop of square box (cx, cy, b) resized to S x S."""
    from ..data.crop import crop_transform
    matrix = crop_transform(np.asarray(box, np.float64), crop_size)
    return points @ matrix[:2, :2].T + matrix[:2, 2]


MESH_COLOUR = (235, 170, 60)  # BGR


def draw_meshes(canvas: np.ndarray, meshes: list[np.ndarray], faces: np.ndarray | None,
                colour=MESH_COLOUR, alpha: float = 0.6) -> np.ndarray:
    """The edges of meshes (each (V, 2) canvas px, pixel-edge convention) blended over a BGR
    canvas -> a new canvas; without faces, the vertices as dots."""
    layer = canvas.copy()
    for pixels in meshes:
        fixed = np.round(np.nan_to_num(pixels - 0.5, nan=-1e4).clip(-1e4, 1e4) * 16).astype(np.int32)
        if faces is not None and len(faces):
            cv2.polylines(layer, list(fixed[np.asarray(faces)]), isClosed=True, color=colour,
                          thickness=1, lineType=cv2.LINE_AA, shift=4)
        else:
            for x, y in fixed:
                cv2.circle(layer, (int(x), int(y)), 16, colour, -1, cv2.LINE_AA, shift=4)
    return cv2.addWeighted(layer, alpha, canvas, 1 - alpha, 0)


def draw_overlay(sample: dict, faces: np.ndarray | None, path, size: int = OVERLAY_SIZE) -> str:
    """The predicted mesh's edges over RoI 0's crop (upscaled to `size`) -> PNG."""
    crop = np.ascontiguousarray(sample["crop"])
    crop_size = crop.shape[0]
    k = size / crop_size
    canvas = cv2.resize(cv2.cvtColor(crop, cv2.COLOR_RGB2BGR), (size, size), interpolation=cv2.INTER_LINEAR)
    verts = full_to_crop(project_vertices(sample["vertices"], sample["cam_full"], sample["focal"],
                                          sample["image_size"]), sample["box"], crop_size) * k
    canvas = draw_meshes(canvas, [verts], faces)
    if sample.get("keypoints_2d") is not None:
        kp = np.asarray(sample["keypoints_2d"], np.float64)
        pts = full_to_crop(kp[:, :2], sample["box"], crop_size) * k - 0.5
        for (x, y), conf in zip(pts, kp[:, 2]):
            if conf > 0 and np.isfinite(x) and np.isfinite(y):
                cv2.circle(canvas, (int(round(x * 16)), int(round(y * 16))), 3 * 16, (60, 200, 60), -1,
                           cv2.LINE_AA, shift=4)
    banner = np.full((22, size, 3), 255, np.uint8)
    cv2.putText(banner, f"MPJPE {sample['mpjpe']:.0f} mm  PA {sample['pa_mpjpe']:.0f} mm", (4, 15),
                cv2.FONT_HERSHEY_SIMPLEX, 0.45, (20, 20, 20), 1, cv2.LINE_AA)
    cv2.imwrite(str(path), np.vstack([canvas, banner]))
    return str(path)


# ----------------------------------------------------------------------------- helpers


def _safe(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", key).strip("_")[:80]


def _fmt(value, digits: int = 2) -> str:
    return "n/a" if value is None else f"{float(value):.{digits}f}"


def _relative(path, base: Path) -> str:
    try:
        return str(Path(path).relative_to(base))
    except ValueError:
        return str(path)


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
