"""A checkpoint's or a finished model's manifest: the size and sha256 of every file, the step and the loss at that
step, written last, once every file of the save is on disk.

Headers and CRCs (`run.checkpoints`) catch a torn file only where its format has them; a checksum also catches a
file cut at a record boundary, rewritten in place by a later save that died, or edited after the save. sha256 (one
`hashlib.file_digest` pass per file) rather than a faster non-cryptographic hash: `sha256sum` can check it by hand,
and reading the files costs about as much as hashing them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from lmpipe.run.files import write_text_atomically

MANIFEST_NAME = "lmpipe-manifest.json"


def sha256_of(path: Path) -> str:
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def write_manifest(directory: str | Path, names: list[str], step: int, loss: float | None) -> Path:
    """Record `names` (paths relative to `directory`) as they are now; atomic, so a reader sees all of it or none."""
    directory = Path(directory)
    files = {n: {"bytes": (directory / n).stat().st_size, "sha256": sha256_of(directory / n)} for n in names}
    path = directory / MANIFEST_NAME
    write_text_atomically(path, json.dumps({"step": step, "loss": loss, "files": files}, indent=1) + "\n")
    return path


def read_manifest(directory: str | Path) -> dict[str, Any] | None:
    """The manifest of `directory`, None when it has none; a damaged one raises ValueError naming it."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        files = manifest.get("files")
        if not isinstance(files, dict) or not all(isinstance(entry, dict) for entry in files.values()):
            raise ValueError("no files")
    except (ValueError, AttributeError) as e:
        raise ValueError(f"{path}: damaged ({type(e).__name__})") from None
    return manifest


def manifest_problem(directory: str | Path) -> str | None:
    """The first file of `directory` that is not as its manifest recorded it; None when all are, or there is none."""
    directory = Path(directory)
    try:
        manifest = read_manifest(directory)
    except ValueError as e:
        return str(e)
    if manifest is None:
        return None
    for name, recorded in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            return f"{path}: missing (listed in {MANIFEST_NAME})"
        size = path.stat().st_size
        if size != recorded.get("bytes"):
            return f"{path}: {size} bytes, not the {recorded.get('bytes')} of its manifest (truncated or rewritten)"
        if sha256_of(path) != recorded.get("sha256"):
            return f"{path}: its sha256 differs from its manifest's (changed since it was saved)"
    return None
