"""Ray for the topologies that need it: start a local instance, or join the cluster in RAY_ADDRESS.

    with RayCluster(num_cpus=2) as cluster:   # rl.topology = disaggregated | async
        ...                                   # Ray actors (rlpost/rollout/ray_engine.py)
    # what this process started is shut down here, on errors and Ctrl-C too

A local instance is always a new one (even when `ray start` left a cluster on this machine: join
that one with RAY_ADDRESS), listens on 127.0.0.1 only, and has no dashboard and no authentication
token (a single user's machine); `RAY_ADDRESS` (e.g. `ray://head:10001` or `head:6379`) joins a running cluster
instead, which is left running. A local instance dies with this process even when it is SIGKILLed (the OOM
killer, preemption): a watcher process (rlpost/reaper.py) kills whatever of it is left within a second.
Only one RayCluster is active per process: when Ray is already initialised (a test's session fixture, a
user's own `ray.init`), it is used as it is and left alone.
"""

from __future__ import annotations

import os

from rlpost.reaper import Reaper

# Ray binds its processes to 127.0.0.1 only with this set (setting the node address alone did not)
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}


def ray_unavailable_reason() -> str | None:
    """Why `import ray` fails here (None: it works)."""
    try:
        import ray  # noqa: F401
    except ImportError as e:
        return f"Ray is not installed ({e}); `pip install 'rlpost[ray]'`"
    return None


class RayCluster:
    """Start (or join) Ray on entry, shut down what was started on exit. `num_cpus`: the local
    instance's CPU count (None: the machine's); actors of rlpost ask for 1 CPU each, so a local
    instance gets at least `min_cpus` so that they can all be placed."""

    def __init__(self, num_cpus: int | None = None, min_cpus: int = 1):
        self.num_cpus, self.min_cpus = num_cpus, min_cpus
        self.started = False   # True: this object started the instance (and stops it)
        self.address: str | None = None
        self._reaper = None    # a local instance's processes die with this one, however it dies

    def __enter__(self) -> "RayCluster":
        reason = ray_unavailable_reason()
        if reason:
            raise RuntimeError(f"rl.topology needs Ray: {reason}")
        import ray

        if ray.is_initialized():
            return self
        address = os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=True)
            self.started, self.address = True, address  # connected: disconnect on exit (the cluster stays)
            return self
        for k, v in LOOPBACK_ENV.items():
            os.environ.setdefault(k, v)
        cpus = max(self.num_cpus or os.cpu_count() or 1, self.min_cpus)
        # started first, so that it sees every Ray process from its start: when this process is SIGKILLed, Ray's
        # head processes die with it, but its dashboard and runtime-env agents would live on for about a minute
        self._reaper = Reaper.start()
        try:
            ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=True,
                     configure_logging=False, _node_ip_address="127.0.0.1")
        except BaseException:
            self._stop_reaper()
            raise
        self.started, self.address = True, "local"
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Shut down (or disconnect from) what __enter__ started; idempotent."""
        if self.started:
            import ray

            ray.shutdown()
            self.started = False
        self._stop_reaper()

    def _stop_reaper(self) -> None:
        if self._reaper is not None:
            self._reaper.stop()
            self._reaper = None
