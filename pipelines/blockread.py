"""What every result store does with its ``_blocks(rel)`` reader: verify a stored object, download it.

A store (S3 :class:`pipelines.resultstore.ResultStore`, folder :class:`pipelines.localstore.LocalStore`)
yields an object's bytes in blocks; both checks read in blocks, never the whole object in memory.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

from .errors import IntegrityError

__all__ = ["BlockReads"]


class BlockReads:
    """``verify`` and ``download`` over a subclass's ``_blocks(rel)`` and ``uri_of(rel)``."""

    def _blocks(self, rel: str) -> Iterator[bytes]:  # pragma: no cover - every store defines it
        raise NotImplementedError

    def uri_of(self, rel: str) -> str:  # pragma: no cover - every store defines it
        raise NotImplementedError

    def verify(self, rel: str, sha256: str, size: int) -> None:
        """Read the object back (in blocks); raise IntegrityError unless size and sha256 match."""
        digest, n = hashlib.sha256(), 0
        for block in self._blocks(rel):
            digest.update(block)
            n += len(block)
        if n != size or digest.hexdigest() != sha256:
            raise IntegrityError(f"{self.uri_of(rel)}: verification after writing failed "
                                 f"({n} bytes, expected {size}); it was not stored intact")

    def download(self, rel: str, dest: str | Path) -> Path:
        """The object as the file ``dest``, written in blocks (never whole in memory), then renamed."""
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(dest.name + ".part")
        with open(part, "wb") as fh:
            for block in self._blocks(rel):
                fh.write(block)
        os.replace(part, dest)
        return dest
