"""The build configuration ships every package and the top-level configs/ and tune/spaces/ as
package data; a non-editable install runs shipped configs by bare name from any directory, and
nothing reads the source tree."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[1]


def test_the_build_lists_every_package_and_maps_the_shipped_folders():
    """pyproject.toml spells the package list out (a `find` directive cannot map configs/ and
    tune/spaces/ into the package): a package folder it forgets would be missing from the wheel."""
    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "raytrain").rglob("*.py")}
    listed = set(tool["packages"])
    assert on_disk <= listed, f"pyproject.toml [tool.setuptools] packages lacks {sorted(on_disk - listed)}"
    assert tool["package-dir"] == {"raytrain.configs": "configs", "raytrain.spaces": "tune/spaces"}
    for package, folder in tool["package-dir"].items():
        assert any((REPO / folder).glob("*.yaml")), folder
        assert not (REPO / package.replace(".", "/")).exists(), f"{package} has a second folder in raytrain/"


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


@pytest.mark.slow
def test_the_wheel_is_what_runs(installed):
    site, _, _ = installed
    out = _run(["-c", "import raytrain; print(raytrain.__file__)"], installed)
    assert out.returncode == 0 and Path(out.stdout.strip()).is_relative_to(site), out


@pytest.mark.slow
def test_shipped_configs_and_spaces_load_by_bare_name_from_any_directory(installed):
    site, _, _ = installed
    code = ("from raytrain.config import load_config, shipped_config, shipped_names\n"
            "from raytrain.tuning.space import load_space\n"
            "cfg = load_config('demo')\n"
            "space = load_space('paper.yaml', load_config('r50_paper'))\n"
            "print(cfg.name, len(space.params), shipped_config('r50_paper'), ','.join(shipped_names('spaces')))")
    out = _run(["-c", code], installed)
    assert out.returncode == 0, out.stderr
    name, params, path, spaces = out.stdout.split()
    assert name == "demo" and int(params) > 0
    assert Path(path) == site / "raytrain" / "configs" / "r50_paper.yaml"
    assert {p.stem for p in (REPO / "tune" / "spaces").glob("*.yaml")} == set(spaces.split(","))
    assert (site / "raytrain" / "spaces" / "README.md").is_file()


@pytest.mark.slow
def test_a_shipped_config_runs_by_bare_name_from_another_directory(installed):
    out = _run(["-m", "raytrain.cli", "demo", "--help"], installed)
    assert out.returncode == 0 and "--quick" in out.stdout, out.stderr
    # the demo's shards do not exist here: doctor says so, after reading the shipped config
    out = _run(["-m", "raytrain.cli", "doctor", "--config", "r50_paper"], installed)
    assert "r50_paper is valid" in out.stdout and "Traceback" not in out.stderr, out
    assert "data.val_shards: cannot read shards at 'shards/3dpw-test'" in out.stdout, out.stdout
    # `configs/...` is a path: here there is no such file, and the message names the bare name
    out = _run(["-m", "raytrain.cli", "train", "--config", "configs/r50_paper.yaml"], installed)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out
    assert "the shipped config of that name is `r50_paper`" in out.stderr + out.stdout, out
