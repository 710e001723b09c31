"""The ablation runner and its table (the paper's Tables 2-4).

    raytrain tune --config configs/demo.yaml --space tune/spaces/ablations.yaml
    print(ablation_table("runs/tune/demo"))

An ablation space is a grid of named `variants` (override sets, tune/spaces/ablations.yaml);
`run_tune` runs each variant to the end (FIFO, no early stopping) and writes
`<experiment>/ablation_table.md`. Each row reports the variant's last validation (the
trained model, not a validation-selected checkpoint): MPJPE / PA-MPJPE / PVE in mm, and —
where the data carries the true camera (synthetic data) — the camera translation error
`val_cam_err` in mm, the quantity L_cam is meant to improve.
"""
from pathlib import Path
from typing import Any

from ..numeric import is_finite_number
from .export import TrialRecord, load_trials
from .space import VARIANT_KEY

TABLE_FILE = "ablation_table.md"
LABELS = {
    "full": "Full method (RAF, L_cam, L_cont, M = 5)",
    "no_raf": "w/o RAF (mean of RoI features)",
    "no_lcam": "w/o L_cam",
    "no_lcont": "w/o L_cont",
    "self_attention": "Self-attention fusion instead of RAF",
    "m1": "M = 1 (single RoI, CLIFF)",
    "m2": "M = 2", "m3": "M = 3", "m4": "M = 4", "m5": "M = 5",
}
COLUMNS = (("val_mpjpe", "MPJPE ↓"), ("val_pa_mpjpe", "PA-MPJPE ↓"), ("val_pve", "PVE ↓"),
           ("val_cam_err", "Cam. transl. err ↓"))


def ablation_rows(experiment_dir: str) -> list[dict[str, Any]]:
    """One row per trial: variant (or parameter summary), final metrics, status."""
    rows = []
    for t in load_trials(experiment_dir):
        last = _last_validation(t)
        name = str(t.params.get(VARIANT_KEY) or _describe(t.params))
        rows.append({"variant": name, "label": LABELS.get(name, name), "trial_id": t.trial_id,
                     "step": last.get("step") if last else None, "errored": t.errored,
                     **{k: last.get(k) for k, _ in COLUMNS if last}})
    order = list(LABELS)
    rows.sort(key=lambda r: (order.index(r["variant"]) if r["variant"] in order else len(order), r["variant"]))
    return rows


def ablation_table(experiment_dir: str) -> str:
    """Markdown table in the format of the paper's Tables 2-4 (mm; Δ against the full method)."""
    rows = ablation_rows(experiment_dir)
    if not rows:
        raise FileNotFoundError(f"no trials under {experiment_dir}")
    with_cam = any(is_finite_number(r.get("val_cam_err")) for r in rows)
    columns = [c for c in COLUMNS if with_cam or c[0] != "val_cam_err"]
    reference = next((r for r in rows if r["variant"] == "full" and is_finite_number(r.get("val_mpjpe"))), None)
    header = ["Variant", *[label for _, label in columns]]
    if reference:
        header.append("Δ MPJPE")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + [":---:"] * (len(header) - 1)) + "|"]
    for r in rows:
        cells = [r["label"]]
        for key, _ in columns:
            cells.append(f"{r[key]:.1f}" if is_finite_number(r.get(key)) else ("failed" if r["errored"] else "–"))
        if reference:
            delta = r.get("val_mpjpe")
            cells.append(f"{delta - reference['val_mpjpe']:+.1f}" if is_finite_number(delta) else "–")
        lines.append("| " + " | ".join(cells) + " |")
    steps = sorted({r["step"] for r in rows if r.get("step") is not None})
    note = (f"\nErrors in mm on the validation set after {', '.join(map(str, steps))} steps "
            "(last validation of each run)")
    if with_cam:
        note += "; camera translation error = mean |t_pred − t_true| of RoI 0's full camera (synthetic data)"
    return "\n".join(lines) + note + ".\n"


def write_ablation_table(experiment_dir: str, path: str | None = None) -> Path:
    out = Path(path) if path else Path(experiment_dir) / TABLE_FILE
    out.write_text(ablation_table(experiment_dir))
    return out


def _last_validation(t: TrialRecord) -> dict[str, Any] | None:
    rows = [r for r in t.results if is_finite_number(r.get("val_mpjpe"))]
    return rows[-1] if rows else None


def _describe(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in params.items()) or "base"
