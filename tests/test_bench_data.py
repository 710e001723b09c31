"""``run_data_bench(quick=True)``: every key, positive values (speeds are measured by the bench
itself, not asserted here: a shared machine would make such a check flaky)."""

import pytest

from raytrain.bench.data import run_data_bench

pytestmark = pytest.mark.slow  # `make test-fast` leaves it out

KEYS = ("decode_per_core", "crop_per_core", "stream_per_core", "full_frame_crop_per_core",
        "bytes_per_sample_context", "bytes_per_sample_full")


def test_quick_data_bench_reports_every_key():
    result = run_data_bench(quick=True)
    for key in KEYS:
        assert key in result, key
        assert isinstance(result[key], float) and result[key] > 0, (key, result[key])
    assert result["bytes_per_sample_context"] < result["bytes_per_sample_full"]
