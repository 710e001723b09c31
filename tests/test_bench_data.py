"""``run_data_bench(quick=True)``: every key, positive values, within a minute (no speed checks)."""
import time

import pytest

from raytrain.bench.data import run_data_bench

pytestmark = pytest.mark.slow  # `make test-fast` leaves it out

KEYS = ("decode_per_core", "crop_per_core", "stream_per_core", "full_frame_crop_per_core",
        "bytes_per_sample_context", "bytes_per_sample_full")


def test_quick_data_bench_reports_every_key():
    start = time.perf_counter()
    result = run_data_bench(quick=True)
    elapsed = time.perf_counter() - start
    for key in KEYS:
        assert key in result, key
        assert isinstance(result[key], float) and result[key] > 0, (key, result[key])
    assert result["bytes_per_sample_context"] < result["bytes_per_sample_full"]
    assert elapsed < 60, elapsed
