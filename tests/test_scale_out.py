"""The README's "Scaling out" recipe runs: an API and two workers in separate network namespaces
reach Redis and PostgreSQL over veth links, and the batch is spread over both worker hosts."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(300)

SCRIPT = Path(__file__).parent.parent / "scripts" / "scale-out-demo.sh"


def test_scale_out_recipe_spreads_tasks_over_two_hosts() -> None:
    as_root = [] if os.geteuid() == 0 else ["sudo", "-n", "--preserve-env"]  # namespaces need root
    done = subprocess.run(
        [*as_root, "bash", str(SCRIPT)],
        env={**os.environ, "TASKS": "40", "PY": sys.executable},
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert re.search(r"^\s+40 202$", out, re.M), out  # every submission answered 202
    assert "completed|40" in out, out
    per_host = dict(re.findall(r"^(cv-w[12]): (\d+)$", out, re.M))
    assert set(per_host) == {"cv-w1", "cv-w2"}, out
    assert all(int(n) > 0 for n in per_host.values()), out
    assert sum(int(n) for n in per_host.values()) == 40, out
