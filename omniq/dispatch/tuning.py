"""Tuning tables: which kernel measured fastest for a problem, per device.

Shipped tables live in omniq/dispatch/tuning/<device>.json; the user cache in
$OMNIQ_CACHE_DIR (default ~/.cache/omniq)/tuning-<device>.json. Writes merge under a file
lock and replace the file atomically, so several processes can tune at once.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
import threading
from pathlib import Path

import torch

SHIPPED_DIR = Path(__file__).with_name("tuning")
_tables: dict[str, dict] = {}
_lock = threading.Lock()


def device_name(device: torch.device) -> str:
    """A file-name-safe name of the device model: 'nvidia-h200', 'cpu', 'npu', ..."""
    if device.type == "cuda" and torch.cuda.is_available():
        name = torch.cuda.get_device_name(device)
    else:
        name = device.type
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def cache_dir() -> Path:
    return Path(os.environ.get("OMNIQ_CACHE_DIR") or Path.home() / ".cache" / "omniq")


def user_table_path(device: torch.device) -> Path:
    return cache_dir() / f"tuning-{device_name(device)}.json"


def _read(path: Path) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
        return data.get("entries", {})
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        return {}  # an unreadable cache is ignored and rewritten on the next tune


def table(device: torch.device) -> dict:
    """Shipped entries overlaid by the user's, for this device (read once per process)."""
    name = device_name(device)
    with _lock:
        if name not in _tables:
            entries = _read(SHIPPED_DIR / f"{name}.json")
            entries.update(_read(user_table_path(device)))
            _tables[name] = entries
        return _tables[name]


def lookup(device: torch.device, key: str) -> dict | None:
    """{'kernel': name, 'times_us': {kernel: us}} or None."""
    return table(device).get(key)


def record(device: torch.device, entries: dict[str, dict], path: Path | None = None) -> Path:
    """Merge `entries` into the user table (or `path`) atomically under a file lock."""
    path = Path(path) if path else user_table_path(device)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = path.with_suffix(path.suffix + ".lock")
    with open(lock_path, "a+") as lock:
        try:
            import fcntl
            fcntl.flock(lock, fcntl.LOCK_EX)
        except ImportError:  # Windows: atomic replace alone still never leaves a torn file
            pass
        merged = _read(path)
        merged.update(entries)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump({"device": device_name(device), "entries": merged}, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    with _lock:
        _tables.setdefault(device_name(device), {}).update(entries)
    return path


def forget() -> None:
    """Drop the in-memory copies (tests, or after editing the files)."""
    with _lock:
        _tables.clear()
