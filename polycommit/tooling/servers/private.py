"""Directories that hold user data (and its before-images): created 0700, tightened when found looser.

The servers' data and logs hold copies of what applications wrote, compensation before-images included;
nobody but their owner may read them. Only directories of polycommit's own trees are created or tightened
here: a tool never changes the mode of a directory it did not make for itself (a parent of the home, `/`).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

PRIVATE_MODE = 0o700


def private_dir(path: Path, tree: Path) -> Path:
    """Create `path` (and its missing ancestors up to `tree`, the project's own tree holding it) with mode
    0700; any of them that exists with group or other bits loses them. `path` must be `tree` or inside it."""
    path, tree = path.absolute(), tree.absolute()
    if path != tree and tree not in path.parents:
        raise ValueError(f"{path} is not inside {tree}")
    if not tree.exists():
        tree.parent.mkdir(parents=True, exist_ok=True)  # the home's parents: created as usual, never changed
    ours = [tree, *reversed([p for p in path.parents if tree in p.parents]), path] if path != tree else [tree]
    for folder in ours:
        if not folder.exists():
            folder.mkdir(mode=PRIVATE_MODE)
        tighten(folder)
    return path


def tighten(folder: Path) -> None:
    """Drop group and other bits of one of our directories (a symlink or somebody else's is left alone)."""
    st = folder.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        return
    if stat.S_IMODE(st.st_mode) & 0o077:
        folder.chmod(stat.S_IMODE(st.st_mode) & PRIVATE_MODE)
