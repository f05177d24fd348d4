"""Small helpers shared by test files (pytest puts this folder on sys.path)."""

from __future__ import annotations

import hashlib
from pathlib import Path


def tree_hash(root: Path) -> str:
    """sha256 over every path and file content under ``root``: equal before and after
    means nothing was created, changed or deleted."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        digest.update(str(path.relative_to(root)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()
