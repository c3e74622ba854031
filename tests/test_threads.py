"""The CPU thread wait policy rlpost sets before torch loads (rlpost/__init__.py)."""

import os
import subprocess
import sys

PROBE = "import os, rlpost; print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))"


def _probe(**env):
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    return subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True,
                          check=True).stdout.split()


def test_waiting_threads_sleep_unless_the_user_chose_a_policy():
    assert _probe() == ["PASSIVE", "None"]
    assert _probe(OMP_WAIT_POLICY="ACTIVE") == ["ACTIVE", "None"]
    assert _probe(GOMP_SPINCOUNT="10000") == ["None", "10000"]

