"""A content-addressed cache of text-encoder outputs, as safetensors.

A text encoder gives the same answer for the same text, and it is the heaviest part of a trial's
start-up (T5-XXL, 4.7 B parameters, for DeepFloyd IF). Each entry is keyed by a hash of the model's
identity (the bytes of its tokenizer and text-encoder files, or a hub id and the commit the hub cache
holds), of what is computed from it (``kind``) and of the exact text. A sweep fills the cache once on
its driver, under the workspace, so every node reads it (from a bucket workspace through a ``CacheMirror``);
``dreamfusion run`` uses ``$DREAMFUSION_CACHE``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
_CHUNK = 1 << 24


def _digest_file(path: Path, memo_dir: Path) -> str:
    """sha256 of a file's bytes, remembered by (path, size, mtime) so multi-GB weights hash once."""
    stat = path.stat()
    memo_key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()
    memo = memo_dir / memo_key
    if memo.is_file():
        return memo.read_text().strip()
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_CHUNK):
            digest.update(block)
    value = digest.hexdigest()
    _write_atomic(memo, lambda target: Path(target).write_text(value))
    return value


def _write_atomic(path: Path, write: Callable[[str], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=path.name, suffix=".partial", delete=False) as handle:
        name = handle.name
    try:
        write(name)
        os.replace(name, path)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise


def _hub_snapshot(model: str, subfolder: str) -> Path | None:
    """The local snapshot folder of a hub model, when the hub cache holds one."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        found = try_to_load_from_cache(model, f"{subfolder}/config.json" if subfolder else "config.json")
    except ValueError:  # not a hub id either (a mistyped path): loading says so, clearly
        return None
    if not isinstance(found, str):
        return None
    return Path(found).parent.parent if subfolder else Path(found).parent


class CacheMirror(Protocol):
    """A second home of the cache's entries (a sweep's object-storage workspace): entries missing here are
    fetched from it, entries computed here are stored in it. ``relative`` is the entry's path in the cache."""

    def fetch(self, relative: str, destination: Path) -> bool: ...

    def store(self, relative: str, source: Path) -> None: ...


class TextEmbeddingCache:
    def __init__(self, root: Path, mirror: CacheMirror | None = None) -> None:
        self.root = Path(root) / "text-embeddings"
        self.mirror = mirror

    def model_identity(self, model: str, subfolders: Sequence[str]) -> str | None:
        """What the cached values depend on: every file of ``subfolders`` (``""``: the model's root) of a
        local model, or a hub model's id and commit; None for a hub model not on this machine yet."""
        root = Path(model).expanduser()
        if not root.is_dir():
            snapshot = _hub_snapshot(model, subfolders[0]) if subfolders else None
            return None if snapshot is None else f"hub:{model}@{snapshot.name}"
        digest = hashlib.sha256()
        for subfolder in subfolders:
            folder = root / subfolder
            if not folder.is_dir():
                return None
            for path in sorted(p for p in folder.iterdir() if p.is_file()):
                digest.update(f"{subfolder}/{path.name}:{_digest_file(path, self.root / 'digests')}\n".encode())
        return f"local:{digest.hexdigest()}"

    def _path(self, identity: str, kind: str, text: str) -> Path:
        key = hashlib.sha256(json.dumps([CACHE_FORMAT, identity, kind, text]).encode()).hexdigest()
        return self.root / key[:2] / f"{key}.safetensors"

    def get(self, identity: str | None, kind: str, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """The cached values among ``texts``; an unreadable entry counts as missing."""
        found: dict[str, torch.Tensor] = {}
        if identity is None:
            return found
        for text in dict.fromkeys(texts):
            path = self._path(identity, kind, text)
            if not path.is_file() and self.mirror is not None:
                self.mirror.fetch(self._relative(path), path)
            if path.is_file():
                try:
                    found[text] = load_file(path)["value"]
                except Exception:  # a truncated entry is recomputed, never trusted
                    log.warning("text-embedding cache entry %s is unreadable; computing it again", path)
        return found

    def put(self, identity: str, kind: str, values: dict[str, torch.Tensor]) -> None:
        for text, value in values.items():
            tensor = value.detach().to("cpu", torch.float32).contiguous()
            path = self._path(identity, kind, text)
            try:
                _write_atomic(path, lambda name, t=tensor: save_file({"value": t}, name))
            except OSError as exc:  # a read-only cache still runs, only slower next time
                log.warning("could not cache text embeddings in %s (%s)", self.root, exc)
                return
            if self.mirror is not None:
                self.mirror.store(self._relative(path), path)

    def _relative(self, path: Path) -> str:
        return path.relative_to(self.root.parent).as_posix()

    def lookup(self, model: str, subfolders: Sequence[str], kind: str, texts: Sequence[str],
               compute: Callable[[list[str]], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Every text's value: from the cache, or from ``compute(missing texts)`` (which loads the encoder),
        then stored. ``compute`` is not called when all are cached."""
        identity = self.model_identity(model, subfolders)
        values = self.get(identity, kind, texts)
        missing = [text for text in dict.fromkeys(texts) if text not in values]
        if missing:
            computed = compute(missing)
            # A hub model is identified only once it is on this machine: after compute() downloaded it.
            identity = identity or self.model_identity(model, subfolders)
            if identity is not None:
                self.put(identity, kind, computed)
            values.update(computed)
        return {text: values[text] for text in texts}
