"""Joining a Ray cluster, or starting a local one: the one rule every entry point follows.

An address (the argument, else `RAY_ADDRESS`) means "connect there". No address means "start
a new local instance" and nothing else: `ray.init()` with no address would instead connect
to whichever cluster Ray last recorded in /tmp/ray/ray_current_cluster, so a `ray start`
left running, or one killed without `ray stop`, would decide where the work runs (and
`num_cpus` would then be refused). `address="local"` is Ray's public way to say "new".
"""
import os


def connect_ray(address: str | None = None, num_cpus: float | None = None, **options) -> bool:
    """Connect to `address` / RAY_ADDRESS, or start a local instance with `num_cpus` CPUs
    (None: all of them). Does nothing if Ray is already initialised in this process; True
    if this call initialised it (the caller then owns `ray.shutdown()`)."""
    import ray
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **options)
    else:
        options.setdefault("include_dashboard", False)
        ray.init(address="local", num_cpus=num_cpus, **options)
    return True
