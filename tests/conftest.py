"""Shared fixtures: small synthetic shard sets written once per test session, the synthetic
body model, a moto S3 server on loopback."""
import contextlib
import os
import secrets
from pathlib import Path

import pytest

os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Ray 2.60 turns token authentication on for new local clusters; clients of a `ray start`
# head must then send the token (~/.ray/auth_token): set the mode before Ray is imported.
# A fresh machine has no token file yet: give this test session its own token.
os.environ["RAY_AUTH_MODE"] = "token"
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`make test` runs `-n 2 --dist loadgroup`), the tests that start
    Ray or take seconds run one after another in one worker (two Ray instances on two
    cores would starve each other); the rest spread over both workers beside them."""
    for item in items:
        if item.get_closest_marker("ray") or item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.xdist_group("heavy"))


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory):
    """(train_dir, val_dir): 48 + 16 rendered synthetic people."""
    from raytrain.synthetic.people import shard_synthetic
    root = tmp_path_factory.mktemp("synthetic")
    shard_synthetic(str(root / "train"), n=48, seed=1, maxcount=16)
    shard_synthetic(str(root / "val"), n=16, seed=2, maxcount=16)
    return str(root / "train"), str(root / "val")


@contextlib.contextmanager
def moto_s3():
    """A moto S3 server on a free loopback port for the duration of the block: its endpoint URL
    (credentials `testing`/`testing`, region us-east-1). Skips when moto, boto3 or s3fs is missing."""
    pytest.importorskip("boto3")
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_endpoint(monkeypatch):
    """A moto S3 server (`moto_s3`) with bucket `runs`; the AWS_* variables point pyarrow (Ray
    Train's storage), s3fs and boto3 at it. Yields a boto3 client."""
    with moto_s3() as endpoint:
        import boto3
        import s3fs
        for key, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                           "AWS_REGION": "us-east-1"}.items():
            monkeypatch.setenv(key, value)
        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket="runs")
        s3fs.S3FileSystem.clear_instance_cache()      # one cached for another endpoint would be reused
        yield client
        s3fs.S3FileSystem.clear_instance_cache()


def body_dir() -> str:
    """The synthetic body model's directory (generated once into $RAYTRAIN_HOME)."""
    from raytrain.synthetic.body_model import default_body_model_dir
    return str(default_body_model_dir())


@pytest.fixture(scope="session")
def body_model():
    """The synthetic body model, every gender (neutral first: the default of forward), loaded
    once per test session; tests read it and never change it (copy it to alter it)."""
    from raytrain.body import load_body_model
    return load_body_model(body_dir(), genders=("neutral", "male", "female"))


def tiny_overrides(train, val, run_dir, **extra):
    """Overrides for a seconds-long training run on CPU."""
    values = {
        "data.train_shards": train, "data.val_shards": val, "data.crop_size": 64,
        "data.batch_size": 4, "data.val_batch_size": 8, "data.loader_workers": 0,
        "data.shuffle_buffer": 8, "model.backbone": "mobilenetv3_small_050",
        "model.decoder_hidden": 64, "model.pe_bands": 4, "optim.max_steps": 6,
        "train.val_every": 3, "train.checkpoint_every": 3, "train.log_every": 1,
        "train.tensorboard": False, "train.storage_path": str(run_dir), "ray.num_cpus": 2,
        "ray.cpus_per_worker": 0.5, "name": "tiny", "model.smpl_dir": body_dir(),
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def free_ports(n: int):
    """n distinct free loopback ports."""
    import socket
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


class LocalRayHead:
    """`ray start --head --block` on free loopback ports in its own temp dir and process
    group, so stopping it touches nothing else on the machine. Use as a context manager;
    `address` is the job-submission URL and `env` the environment to run clients with."""

    def __init__(self, num_cpus: int = 2, path_prefix=()):
        import os
        import sys
        import tempfile
        self.bin = Path(sys.executable).parent
        # Ray's socket paths must stay under 107 bytes: pytest's tmp_path is too deep.
        self.temp_dir = tempfile.mkdtemp(prefix="rtc-", dir="/tmp")
        self.env = dict(os.environ)
        self.env["PATH"] = os.pathsep.join([*map(str, path_prefix), str(self.bin), self.env["PATH"]])
        self.env.pop("RAY_ADDRESS", None)
        self.num_cpus = num_cpus
        self.head = None

    def __enter__(self):
        import subprocess
        import time

        from ray.job_submission import JobSubmissionClient
        gcs, dash, agent, client = free_ports(4)
        self.head = subprocess.Popen(
            [str(self.bin / "ray"), "start", "--head", "--block", f"--port={gcs}",
             f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1",
             f"--dashboard-agent-listen-port={agent}", f"--ray-client-server-port={client}",
             f"--num-cpus={self.num_cpus}", "--num-gpus=0", "--include-dashboard=true",
             "--disable-usage-stats", f"--temp-dir={self.temp_dir}"],
            env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True)
        self.address = f"http://127.0.0.1:{dash}"
        self.env["RAY_ADDRESS"] = self.address
        deadline, error = time.time() + 180, None
        while time.time() < deadline:
            assert self.head.poll() is None, f"ray start exited:\n{self.head.stdout.read()}"
            try:
                self.client = JobSubmissionClient(self.address)
                return self
            except Exception as exc:  # not up yet
                error = exc
                time.sleep(1)
        self.__exit__()
        raise AssertionError(f"the local Ray head's job server did not come up: {error!r}")

    def __exit__(self, *exc):
        import os
        import shutil
        import signal
        import subprocess
        if self.head.poll() is None:
            # `ray start --block` stops its processes in ~3 s on SIGINT, ~30 s on SIGTERM
            self.head.send_signal(signal.SIGINT)
            try:
                self.head.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.head.wait(timeout=10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def wait_for_job(self, job_id: str, timeout: float):
        """Final JobStatus and the job's logs."""
        import time

        from ray.job_submission import JobStatus
        deadline, status = time.time() + timeout, None
        while time.time() < deadline:
            status = self.client.get_job_status(job_id)
            if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
                break
            time.sleep(1)
        return status, self.client.get_job_logs(job_id)
