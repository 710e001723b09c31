"""`raytrain doctor`: check the environment, one line per check, and say how to fix what is missing.

    raytrain doctor [--config configs/demo.yaml] [--smpl-dir DIR]

Checks: Python / torch / Ray versions; the Ray cluster (RAY_ADDRESS or `ray.address`,
else this machine's CPUs and GPUs); GPUs as torch sees them; the body model files; the
shard sets the config's run reads (`data.train_shards` or each `data.mixture` source of
positive weight, and `data.val_shards`). Every line starts with OK or MISSING; a MISSING
line names the fix. Lines marked "(optional)" do not fail.
Exit code: 0 when every required check passes, 1 otherwise.
"""
import os
import platform
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass

from ..connect import connect_ray

OK, MISSING = "OK", "MISSING"


@dataclass
class Check:
    status: str
    name: str
    message: str
    required: bool = True

    @property
    def failed(self) -> bool:
        return self.status != OK and self.required

    def line(self) -> str:
        optional = " (optional)" if self.status != OK and not self.required else ""
        return f"{self.status:<8} {self.name}{optional}: {self.message}"


def run_doctor(config: str | None = None, smpl_dir: str | None = None,
               print_fn: Callable[[str], None] = print) -> int:
    """Run every check, print one line each and a verdict; return the exit code."""
    cfg, checks = None, []
    if config:
        from ..config import ConfigError, load_config
        try:
            cfg = load_config(config)
            checks.append(Check(OK, "config", f"{config} is valid"))
        except ConfigError as err:
            checks.append(Check(MISSING, "config", f"{err}; fix the file or pass another --config"))
    checks.append(check_versions())
    checks.append(check_ray(cfg))
    checks.append(check_gpus(cfg))
    checks.append(check_body_model(smpl_dir if smpl_dir is not None else
                                   (cfg.model.smpl_dir if cfg is not None else None),
                                   from_flag=smpl_dir is not None))
    checks.extend(check_shards(cfg, config_given=bool(config)))
    for check in checks:
        print_fn(check.line())
    failed = [c for c in checks if c.failed]
    if failed:
        print_fn(f"{len(failed)} problem(s): {', '.join(c.name for c in failed)}")
        return 1
    print_fn("all required checks passed")
    return 0


# ----------------------------------------------------------------------------- checks


def check_versions() -> Check:
    import torch
    try:
        import ray
        ray_version = ray.__version__
    except ImportError:
        return Check(MISSING, "versions", "ray is not installed; fix: pip install -e . (or make venv)")
    return Check(OK, "versions", f"python {platform.python_version()}, torch {torch.__version__}, "
                                 f"ray {ray_version}")


def check_ray(cfg=None, connect_timeout: float = 3.0) -> Check:
    """The cluster named by ray.address / RAY_ADDRESS (reachable? resources), else local resources."""
    address = (cfg.ray.address if cfg is not None else None) or os.environ.get("RAY_ADDRESS")
    if not address:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        gpus = _torch_gpu_count()
        return Check(OK, "ray cluster", f"none configured (RAY_ADDRESS unset): train / tune start a "
                                        f"local Ray instance on this machine: {cpus} CPU, {gpus} GPU; "
                                        "set RAY_ADDRESS=<head>:6379 to use a cluster")
    hostport = _host_port(address)
    if hostport is not None:
        try:
            with socket.create_connection(hostport, timeout=connect_timeout):
                pass
        except OSError as err:
            return Check(MISSING, "ray cluster", f"{address} is not reachable ({err}); fix: start the "
                                                 "head (`ray up cluster/aws.yaml` or `ray start --head`) "
                                                 "or unset RAY_ADDRESS to run locally")
    try:
        import ray
        started_here = connect_ray(address, logging_level="ERROR", log_to_driver=False)
        try:
            resources = ray.cluster_resources()
            nodes = len([n for n in ray.nodes() if n.get("Alive")])
        finally:
            if started_here:
                ray.shutdown()
    except Exception as err:    # noqa: BLE001 - any failure to connect is the finding
        return Check(MISSING, "ray cluster", f"cannot connect to {address}: {str(err).splitlines()[0]}; "
                                             "fix: check the address (ray status on the head) or unset "
                                             "RAY_ADDRESS to run locally")
    return Check(OK, "ray cluster", f"{address}: {nodes} node(s), {resources.get('CPU', 0):g} CPU, "
                                    f"{resources.get('GPU', 0):g} GPU")


def check_gpus(cfg=None) -> Check:
    import torch
    count = _torch_gpu_count()
    wants_gpu = cfg is not None and cfg.ray.use_gpu
    if count == 0:
        if wants_gpu:
            return Check(MISSING, "gpus", "ray.use_gpu=true but torch sees no CUDA GPU on this machine; fix: "
                                          "run on a GPU node (RAY_ADDRESS) or set ray.use_gpu=false")
        return Check(OK, "gpus", "none visible to torch (CUDA "
                                 f"{'built' if torch.backends.cuda.is_built() else 'not built'}"
                                 "): training runs on CPU (ray.use_gpu=false)")
    names = [torch.cuda.get_device_name(i) for i in range(count)]
    return Check(OK, "gpus", f"{count} visible to torch: {', '.join(names)}")


def check_body_model(smpl_dir: str | None, from_flag: bool = True) -> Check:
    """SMPL files in `smpl_dir`, or the one-line note that the synthetic body model is used."""
    from ..body.model import GENDER_FILES, REQUIRED_FILES
    if not smpl_dir:
        return Check(MISSING, "body model", "no SMPL files configured, the synthetic body model is used; "
                                            "fix: pass --smpl-dir DIR (config key model.smpl_dir)",
                     required=False)
    where = "--smpl-dir" if from_flag else "model.smpl_dir"
    path = os.path.expanduser(smpl_dir)
    if not os.path.isdir(path):
        return Check(MISSING, "body model", f"{where}={smpl_dir} is not a directory; fix: point it at the "
                                            f"folder holding {', '.join(REQUIRED_FILES)}")
    needed = list(dict.fromkeys([*GENDER_FILES.values(), *REQUIRED_FILES]))
    missing = [name for name in needed if not os.path.isfile(os.path.join(path, name))]
    if missing:
        return Check(MISSING, "body model", f"{where}={smpl_dir} lacks {', '.join(missing)} (training and "
                                            "eval load all three genders); fix: copy them there (SMPL from "
                                            "smpl.is.tue.mpg.de; J_regressor_h36m.npy and smpl_mean_params.npz "
                                            "from SPIN's data)")
    return Check(OK, "body model", f"SMPL files in {smpl_dir}: {', '.join(needed)}")


def check_shards(cfg=None, config_given: bool = False) -> list[Check]:
    """Every shard set the config's run reads (``data.pipeline.shard_sets``): manifest
    readable, shards present as recorded, samples > 0."""
    if cfg is None:
        if config_given:
            return []            # the config line already failed
        return [Check(MISSING, "shards", "no --config given, no shard manifest to check; fix: "
                                         "raytrain doctor --config configs/demo.yaml", required=False)]
    from ..data.pipeline import shard_sets
    return [check_shard_set(s.key, s.source) for s in shard_sets(cfg)]


def check_shard_set(key: str, source: str) -> Check:
    """The pre-flight's shard check (``data.shards.checked_shards``, one manifest read),
    also refusing a listed shard that is missing or of another size than recorded."""
    from ..config import ConfigError
    from ..data.shards import SIZES, checked_shards
    fix = (f"fix: write shards there (`raytrain shard synthetic --out {source or 'shards/NAME'}`) "
           f"or set {key} to existing shards")
    try:
        refs = checked_shards(key, source, verify=SIZES)
    except ConfigError as err:
        return Check(MISSING, key, f"{str(err).removeprefix(f'{key}: ')}; {fix}")
    except Exception as err:    # noqa: BLE001 - unreadable for any reason is the finding
        return Check(MISSING, key, f"{source}: {str(err).splitlines()[0] if str(err) else type(err).__name__}; {fix}")
    total = sum(ref.num_samples for ref in refs)
    return Check(OK, key, f"{source}: {total} samples in {len(refs)} shard(s)")


# ----------------------------------------------------------------------------- helpers


def _torch_gpu_count() -> int:
    import torch
    try:
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:           # noqa: BLE001 - a broken driver counts as no GPU
        return 0


def _host_port(address: str):
    """'10.0.0.1:6379' -> ('10.0.0.1', 6379); 'ray://h:10001' -> ('h', 10001); 'auto' -> None."""
    text = address.split("://", 1)[-1]
    if ":" not in text:
        return None
    host, _, port = text.rpartition(":")
    try:
        return host or "127.0.0.1", int(port.split("/")[0])
    except ValueError:
        return None


if __name__ == "__main__":
    sys.exit(run_doctor(*sys.argv[1:2]))
