"""manifest.json: what a complete checkpoint directory holds, so a damaged one is named before it is read.

Written last by whoever writes a checkpoint (trainer/checkpoint.py, conversions.py): every file's size,
and the checksum of the small ones. `damaged_file` compares the directory with it and names the first
file truncated, deleted or overwritten since. The tensor data (.distcp) is checked by size only: hashing
it would cost a read of the whole model, and torch.distributed.checkpoint keeps no checksum of its own.
"""
import hashlib
import json
import os
from typing import Dict, Optional

MANIFEST = "manifest.json"
# files up to this size (RNG, data, common and metadata files, the tokenizer) are checksummed as well
_CHECKSUMMED_BYTES = 64 << 20


def _file_record(path: str) -> Dict:
    record = {"bytes": os.path.getsize(path)}
    if record["bytes"] <= _CHECKSUMMED_BYTES:
        with open(path, "rb") as handle:
            record["sha256"] = hashlib.file_digest(handle, "sha256").hexdigest()
    return record


def write_manifest(directory: str) -> None:
    """Record every file under directory (its size, and the checksum of small files) in manifest.json."""
    files = {}
    for folder, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(folder, name)
            if os.path.relpath(path, directory) not in (MANIFEST, MANIFEST + ".tmp"):
                files[os.path.relpath(path, directory)] = _file_record(path)
    with open(os.path.join(directory, MANIFEST + ".tmp"), "w") as handle:
        json.dump({"files": files}, handle, indent=1, sort_keys=True)
    os.replace(os.path.join(directory, MANIFEST + ".tmp"), os.path.join(directory, MANIFEST))


def damaged_file(directory: str) -> Optional[str]:
    """What is wrong with the checkpoint's files, naming the first bad one (None when they are as written).
    Checkpoints from before manifests are checked for megatron's metadata.json only."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
        if os.path.exists(os.path.join(directory, "metadata.json")):
            return None
        return f"{os.path.join(directory, 'metadata.json')} is missing: not a complete distributed checkpoint"
    try:
        with open(path) as handle:
            files = json.load(handle)["files"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"{path} is unreadable ({type(error).__name__}: {error})"
    for name, written in sorted(files.items()):
        file = os.path.join(directory, name)
        if not os.path.isfile(file):
            return f"{file} is missing"
        found = _file_record(file) if "sha256" in written else {"bytes": os.path.getsize(file)}
        if found["bytes"] != written["bytes"]:
            return f"{file} has {found['bytes']} bytes where {written['bytes']} were written (truncated or replaced)"
        if found != written:
            return f"{file} differs from what was written (checksum mismatch: corrupted)"
    return None
