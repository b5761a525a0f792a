"""Folders that appear complete or not at all: written under a temporary name, then swapped in by renames."""

import os
import shutil
from pathlib import Path

from .errors import UserError


def fresh_folder(out_dir: Path, what: str = "folder") -> Path:
    """An empty `out_dir.tmp` to write `what` into (replace_folder renames it over out_dir)."""
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    except OSError as e:
        raise UserError(f"cannot write the {what} next to {out_dir} ({e.strerror}); choose another --out") from None
    return tmp


def replace_folder(tmp: Path, out_dir: Path) -> None:
    """Put the finished `tmp` at `out_dir`; a previous folder there disappears only once the new one is in place
    (two renames: out_dir -> out_dir.old, tmp -> out_dir)."""
    if out_dir.exists():
        old = out_dir.with_name(out_dir.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out_dir)
