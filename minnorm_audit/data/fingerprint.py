"""The dataset fingerprint: sha256 over length-prefixed fields (sources, labels or
targets, input bytes, plus the kind, task and image size), the same on every machine."""

from __future__ import annotations

import hashlib

import numpy as np

_FINGERPRINT_VERSION = "minnorm-audit-data-v1"


def _little_endian_bytes(array: np.ndarray) -> bytes:
    """Array bytes in a fixed byte order, so the fingerprint does not depend on the machine."""
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


class _Fingerprint:
    """sha256 over length-prefixed fields, so ("ab", "c") and ("a", "bc") differ."""

    def __init__(self, kind: str, task: str, image_size: int | None) -> None:
        self._hash = hashlib.sha256()
        for field in (_FINGERPRINT_VERSION, kind, task, str(image_size)):
            self.add_text(field)

    def add_text(self, text: str) -> None:
        # surrogateescape: file names that are not valid UTF-8 still hash (os.walk hands them over escaped).
        self.add_bytes(text.encode("utf-8", errors="surrogateescape"))

    def add_bytes(self, data: bytes) -> None:
        self._hash.update(len(data).to_bytes(8, "little"))
        self._hash.update(data)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()
