"""Whether a path can serve as an output folder, said before anything is written.

Shared by the run's ``output_dir`` (checked at config load) and make_shards' OUT_DIR: both may
name a folder that does not exist yet (it is created on first write), so the check walks up to
the nearest existing path, which must be a writable folder.
"""
from __future__ import annotations

import os
from pathlib import Path


def output_folder_problem(folder: Path) -> str | None:
    """Why ``folder`` cannot be created or written into, as a sentence naming the path at fault
    (the caller adds what to do), or None when it can."""
    if folder.exists() and not folder.is_dir():
        return f"{folder} is a file, not a folder"
    existing = folder
    while not existing.exists():
        if existing.is_symlink():
            return f"{existing} is a broken link"
        existing = existing.parent
    if not existing.is_dir():
        return f"{folder} lies under {existing}, which is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable, so {folder} cannot be written into"
    return None
