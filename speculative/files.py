"""File helpers shared by everything that writes models: atomic directories and checksums."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a staging directory that replaces ``final`` only if the block finishes.

    A crash (or exception) mid-write leaves ``final`` as it was, never half written.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=final.name + ".", dir=final.parent))
    staging.chmod(0o755)
    try:
        yield staging
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


MANIFEST = "MANIFEST.json"


class CorruptedFiles(RuntimeError):
    """A saved directory no longer matches the checksums written with it (truncated or corrupted)."""


def write_manifest(directory: Path) -> Path:
    """Record size and sha256 of every file under ``directory`` (call last, before committing)."""
    directory = Path(directory)
    files = {
        str(path.relative_to(directory)): {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }
    target = directory / MANIFEST
    target.write_text(json.dumps({"files": files}, indent=1))
    return target


def verify_manifest(directory: Path) -> None:
    """Raise ``CorruptedFiles`` naming the first missing, resized or altered file."""
    directory = Path(directory)
    manifest = directory / MANIFEST
    if not manifest.is_file():
        raise CorruptedFiles(f"{directory}: no {MANIFEST} (an incomplete or foreign checkpoint)")
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as error:
        raise CorruptedFiles(f"{manifest}: unreadable ({error})") from None
    for name, expected in files.items():
        path = directory / name
        if not path.is_file():
            raise CorruptedFiles(f"{path}: missing (listed in {manifest})")
        if path.stat().st_size != expected["bytes"]:
            raise CorruptedFiles(f"{path}: {path.stat().st_size} bytes, {expected['bytes']} when saved (truncated?)")
        if file_sha256(path) != expected["sha256"]:
            raise CorruptedFiles(f"{path}: sha256 differs from the one saved in {manifest} (corrupted)")
