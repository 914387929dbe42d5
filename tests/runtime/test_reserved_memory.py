"""reserved_memory under a real address-space limit (`ulimit -v`), in a process of its own."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import json, resource
    from service.runtime.reserved_memory import mapping_allowed, reserved_zeros
    from service.runtime.state_pool import ByteBudget, StatePool
    from tests.runtime.conftest import token_config

    config = token_config("lstm")
    before = {"allowed": mapping_allowed(), "mapped": reserved_zeros((2, 1 << 20, 16)) is not None}
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), hard))  # 1 GiB more than now
    pool = StatePool(config, ByteBudget(8 << 30), initial_slots=2, head=lambda h: h)
    slots = [pool.allocate() for _ in range(5)]  # grown past its first two slots
    pool.h[:, slots[0]] = 3.0
    pool.allocate()
    print(json.dumps({
        "before": before,
        "allowed": mapping_allowed(),
        "reserved": pool._reserved,
        "capacity": pool.capacity,
        "kept": float(pool.h[0, slots[0], 0]),
    }))
    """
)


def test_under_a_real_address_space_limit_the_pool_grows_by_copying() -> None:
    """An 8 GiB budget mapped up front would not fit under a 1 GiB `ulimit -v` margin; the
    pool sees the limit and grows by copying, and keeps what its slots held."""
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["before"] == {"allowed": True, "mapped": True}  # no limit: mapped
    assert got["allowed"] is False and got["reserved"] is False
    assert got["capacity"] >= 6 and got["kept"] == 3.0
