"""The localization mode as one value: `localization.mode` names a `SearchPolicy`, and that policy is what the
search receives (no flags or function choices travel separately)."""

from __future__ import annotations

from typing import Literal

from .fast import FAST
from .localize import EXACT, SearchPolicy

Mode = Literal["exact", "fast"]
POLICIES: dict[str, SearchPolicy] = {"exact": EXACT, "fast": FAST}
