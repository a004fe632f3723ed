"""Where discq keeps what it fetches or builds once per machine: $DISCQ_CACHE, default
~/.cache/discq (the Shakespeare corpus, the compiled CPU kernel)."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("DISCQ_CACHE") or Path.home() / ".cache" / "discq")
