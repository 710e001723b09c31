"""`raytrain demo --quick`: the whole story end to end, and what its summary reports."""
import json
import math
import os
import subprocess
import sys

import pytest
from conftest import REPO


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(1200)
def test_quick_demo_summary_has_the_baselines_beside_the_errors(tmp_path):
    """The summary puts the mean pose beside PA-MPJPE and the constant camera (the train
    split's median crop camera) and the scale ratio beside the camera error."""
    out = tmp_path / "demo"
    env = dict(os.environ, RAY_TRAIN_ENABLE_PRINT_PATCH="0", PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-m", "raytrain.cli", "demo", "--quick", "--out", str(out)],
                          cwd=str(REPO), env=env, capture_output=True, text=True, timeout=1100)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    for key in ("pa_mpjpe_mm", "baseline_pa_mpjpe_mm", "cam_err_mm", "const_cam_err_mm", "scale_ratio"):
        assert isinstance(summary[key], float) and math.isfinite(summary[key]) and summary[key] > 0, key
    assert len(summary["const_cam"]) == 3 and 0 < summary["const_cam"][0]        # (s, tx, ty), s > 0
    log = (out / "demo.log").read_text()
    assert "for the constant camera" in log and "constant camera (the train split's median crop camera)" in log
    assert summary["3dpw_format_demo_model"]["const_cam_err"] > 0                 # eval's report has it too
    assert "scale_ratio" in summary["3dpw_format_demo_model"]
