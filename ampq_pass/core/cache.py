"""A small on-disk cache of JSON results keyed by content hashes.

Entries are written atomically (temp file + rename), so a killed run never leaves a
corrupt entry and a rerun picks up every finished one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from typing import Callable, TypeVar

import onnx

from ampq_pass.core.errors import AmpqError
from ampq_pass.core.proto import set_field

T = TypeVar("T")


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], *, what: str | None = None) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, flush it to disk, then rename it
    over ``path``: readers see the old file or the new one, never half of one.

    The fsync before the rename matters after a crash: a rename can reach the disk before
    the bytes it publishes. An :class:`OSError` becomes :class:`AmpqError` naming ``what``
    (default: the path); the temporary file never outlives the call.
    """
    path = Path(path)
    what = what or str(path)
    folder = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
        os.close(fd)
    except OSError as exc:
        raise AmpqError(f"{what}: cannot write ({exc.strerror or exc})") from None
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise AmpqError(f"{what}: cannot write ({exc.strerror or exc})") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def save_json(data: dict, path: str | os.PathLike) -> Path:
    """``data`` as indented JSON at ``path``, written atomically."""
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1, sort_keys=False)

    return atomic_write(path, write)


def digest(*parts: object) -> str:
    """A stable sha256 hex digest of JSON-serialisable parts (bytes are hashed raw)."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, (bytes, bytearray, memoryview)):
            h.update(bytes(part))
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"\x00")
    return h.hexdigest()


def model_digest(model: onnx.ModelProto) -> str:
    """Digest of a model's graph and weights (external data included, once loaded).

    Weights are hashed one tensor at a time and the graph without them, so a >2 GB model is
    never copied or serialised whole (``GraphProto.CopyFrom`` would double its memory).
    """
    h = hashlib.sha256()
    for t in model.graph.initializer:
        h.update(t.name.encode())
        h.update(t.raw_data if t.HasField("raw_data") else t.SerializeToString(deterministic=True))
    g = onnx.GraphProto()
    for fd, value in model.graph.ListFields():
        if fd.name == "initializer":
            continue
        set_field(g, fd, value)
    h.update(g.SerializeToString(deterministic=True))
    return h.hexdigest()


class Cache:
    """JSON entries under ``root/<kind>/<key>.json``."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / f"{key}.json"

    def get(self, kind: str, key: str) -> dict | None:
        """The entry, or None when absent or unreadable (a damaged entry is recomputed, not trusted)."""
        try:
            value = json.loads(self.path(kind, key).read_text())
        except (OSError, ValueError):  # missing, a directory, unreadable, not UTF-8, not JSON
            return None
        return value if isinstance(value, dict) else None

    def check_writable(self) -> None:
        """Fail before any work when entries could not be stored (a read-only or full disk,
        a path that is a file): a long run should not discover it at its first result."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".probe.", dir=self.root)
            try:
                os.write(fd, b"{}")
            finally:
                os.close(fd)
                os.unlink(probe)
        except OSError as exc:
            raise AmpqError(f"cache directory {self.root}: cannot write ({exc.strerror or exc}); "
                            f"choose another --cache-dir") from None

    def put(self, kind: str, key: str, value: dict) -> None:
        target = self.path(kind, key)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise AmpqError(f"cache directory {self.root}: cannot write ({exc.strerror or exc})") from None

        def write(tmp: str) -> None:
            with open(tmp, "w") as f:
                json.dump(value, f)

        atomic_write(target, write, what=f"cache directory {self.root}")


class MemoryCache(Cache):
    """Entries held in this process only: what a stage uses when the user asked for no disk
    cache, so that within one run a result is still computed once per key."""

    def __init__(self):
        super().__init__(".")
        self._entries: dict[tuple[str, str], str] = {}

    def get(self, kind: str, key: str) -> dict | None:
        text = self._entries.get((kind, key))
        return None if text is None else json.loads(text)  # a fresh copy each time, as from disk

    def check_writable(self) -> None:
        pass

    def put(self, kind: str, key: str, value: dict) -> None:
        self._entries[(kind, key)] = json.dumps(value)


def cached(cache: Cache | None, kind: str, key: str, compute: Callable[[], T], *,
           dump: Callable[[T], dict], load: Callable[[dict], T]) -> tuple[T, bool]:
    """``(value, hit)``: the entry ``kind/key`` of ``cache`` read back with ``load`` when it is
    there, else ``compute()`` stored with ``dump``. Every cached stage goes through here, so a
    stage is computed at most once per key and an interrupted run resumes at the first
    missing entry."""
    if cache is not None and (hit := cache.get(kind, key)) is not None:
        return load(hit), True
    value = compute()
    if cache is not None:
        cache.put(kind, key, dump(value))
    return value, False
