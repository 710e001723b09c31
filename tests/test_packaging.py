"""A non-editable install works from any directory: configs and search spaces ship as
package data, and nothing reads the source tree."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # `make test-fast` leaves it out

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The project's wheel, installed (without dependencies: the test environment's are
    reused) into a scratch folder that comes first on the path."""
    root = tmp_path_factory.mktemp("wheel")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                            "-q", "-w", str(root / "dist"), str(REPO)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    wheel = next((root / "dist").glob("raytrain-*.whl"))
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                              str(root / "site"), str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    env = {**os.environ, "PYTHONPATH": str(root / "site")}
    return root / "site", elsewhere, env


def _run(args, installed, timeout=300):
    site, elsewhere, env = installed
    return subprocess.run([sys.executable, *args], cwd=elsewhere, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_the_wheel_is_what_runs(installed):
    site, _, _ = installed
    out = _run(["-c", "import raytrain; print(raytrain.__file__)"], installed)
    assert out.returncode == 0 and Path(out.stdout.strip()).is_relative_to(site), out


def test_documented_configs_and_spaces_load_from_any_directory(installed):
    code = ("from raytrain.config import load_config\n"
            "from raytrain.tuning.space import load_space\n"
            "cfg = load_config('configs/demo.yaml')\n"
            "space = load_space('tune/spaces/demo.yaml', cfg)\n"
            "print(cfg.name, len(space.params))")
    out = _run(["-c", code], installed)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == "demo"


def test_demo_help_and_doctor_from_another_directory(installed):
    out = _run(["-m", "raytrain.cli", "demo", "--help"], installed)
    assert out.returncode == 0 and "--quick" in out.stdout, out.stderr
    # the demo's shards do not exist here: doctor says so, after finding the shipped config
    out = _run(["-m", "raytrain.cli", "doctor", "--config", "configs/demo.yaml"], installed)
    assert "configs/demo.yaml is valid" in out.stdout and "Traceback" not in out.stderr, out
