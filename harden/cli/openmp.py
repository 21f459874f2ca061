"""Set before torch loads: idle OpenMP threads sleep instead of spinning.

torch's OpenMP threads spin while they wait for work. Where the cores are shared (a CI runner, a 2-core machine with
other jobs, harden's own worker threads) the spinning takes the cores from the work: a repair step measured 14x
slower under load (docs/repair.md), the test suite 2-3x slower. An `OMP_WAIT_POLICY` in the environment wins.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
