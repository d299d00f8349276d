"""Where lstmlm keeps what it fetches or makes once and reuses: $LSTMLM_HOME, else ~/.cache/lstmlm.

<home>/                  corpora downloaded (download.py)
<home>/encoded/          token stores and their index (cache.py)
<home>/native/           the compiled recurrence (lstmlm.native; LSTMLM_NATIVE_DIR overrides)
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(override: str | Path | None = None) -> Path:
    """The cache's root: the override, else $LSTMLM_HOME, else ~/.cache/lstmlm."""
    if override is not None:
        return Path(override)
    return Path(os.environ.get("LSTMLM_HOME") or Path.home() / ".cache" / "lstmlm")
