"""``raytrain bench gpu --device cpu --quick --json``: the GPU check's script runs end to end
at tiny sizes and prints every field (no speed checks: numbers go to BENCHMARKS.md)."""
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO

pytestmark = pytest.mark.slow  # `make test-fast` leaves it out

TRAIN_RUNS = ("r50_fp32", "r50_bf16_cl", "r50_bf16_cl_device_crop", "h48_fp32", "h48_bf16_cl", "vit_b_bf16",
              "vit_h_bf16")


def _bench(*args, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "raytrain.cli", "bench", "gpu", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout)


def test_quick_gpu_bench_on_cpu_prints_every_field(tmp_path):
    out = tmp_path / "bench_gpu.json"
    run = _bench("--device", "cpu", "--quick", "--json", "--out", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout)  # stdout holds the JSON object alone
    assert json.loads(out.read_text()) == result
    assert set(result["train"]) == set(TRAIN_RUNS)
    for name, row in result["train"].items():
        assert row["persons_per_s"] > 0 and row["peak_memory_gib"] > 0, (name, row)
    assert result["train"]["r50_bf16_cl_device_crop"]["device_crop"] is True
    assert result["train"]["r50_bf16_cl"]["channels_last"] is True
    for name in ("vit_b_bf16", "vit_h_bf16"):  # quick: the tiny ViT in the ViT configs
        row = result["train"][name]
        assert row["backbone"] == "vit_tiny" and row["channels_last"] is False, row
    assert set(result["inference"]) == {"r50", "h48"}
    for mode in ("cpu_crop", "device_crop"):
        cost = result["data_path"][mode]
        assert cost["loader_cpu_s_per_person"] > 0 and cost["main_cpu_s_per_person"] > 0, cost
    for model in ("r50", "h48"):
        variants = result["inference"][model]
        assert set(variants) == {"fp32_batch1", "bf16_batch2", "bf16_batch2_compiled"}, variants
        assert all(v["images_per_s"] > 0 for v in variants.values()), variants
        assert variants["bf16_batch2"]["amp"] == "bf16"
    precision = result["precision"]
    assert precision["agree"], precision  # CPU bf16 autocast against fp32, same batch and weights
    assert 0 < precision["loss_rel_diff"] < 0.02 and precision["grad_cosine"] < 1.0


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_gpu_bench_without_cuda_says_so_in_one_line():
    run = _bench("--json", timeout=120)
    assert run.returncode != 0
    assert run.stderr.strip().splitlines() == [
        "raytrain bench gpu: no CUDA device here; pass --device cpu (with --quick for the smoke run)"]
