"""Where a command's Ray runs: an address joins a cluster, no address starts a new local one."""
import os
import shutil
import tempfile
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray]


@pytest.mark.timeout(180)
def test_no_address_starts_its_own_instance_despite_a_recorded_cluster(monkeypatch):
    """A cluster Ray recorded in ray_current_cluster (a `ray start` killed without `ray stop`)
    does not capture a command run without an address: it starts its own local instance
    with the CPUs it asked for (a bare `ray.init(num_cpus=...)` refuses to start here)."""
    import ray

    from raytrain.connect import connect_ray
    temp = tempfile.mkdtemp(prefix="rtt-", dir="/tmp")     # Ray's socket paths stay short
    monkeypatch.setenv("RAY_TMPDIR", temp)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    os.makedirs(f"{temp}/ray")
    Path(temp, "ray", "ray_current_cluster").write_text("127.0.0.1:1")
    try:
        assert connect_ray(num_cpus=1, log_to_driver=False)
        assert ray.cluster_resources()["CPU"] == 1
        assert not connect_ray(num_cpus=2), "an initialised Ray is left as it is"
        assert ray.cluster_resources()["CPU"] == 1
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
