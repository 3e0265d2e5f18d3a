"""Recordings every extraction on a model repeats, made once: the gate's safe, dressed-up safe and edgy prompts.

A policy gate learns from the policy's own prompts and from negatives that are the same for every
category with the same safe prompts: about three quarters of the gate's recording on the built-in
examples. They are kept per model and per *set* of prompts, in memory and on disk, so a cached
recording is bit for bit the one it replaces (a prompt's activations depend on its batch at the
last float bit) and a restart does not pay for them again. `warm` records them ahead of time, so an
author's first extraction only records the category's own prompts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch

from .activations import Token, default_batch_size, record_activations
from .architectures import Site
from .checkpoints import default_cache_dir
from .models import LoadedModel
from .progress import ProgressCallback, no_progress

log = logging.getLogger(__name__)

FORMAT = 1
MEMORY_BYTES = 512 * 2**20
"""Recordings kept in memory at most (the embedded model's three gate negatives take 83 MB; an 8B model's, 770 MB)."""
DISK_BYTES = 4 * 2**30
"""The cache folder's size at most; the least recently used recordings go first."""

_memory: OrderedDict[str, torch.Tensor] = OrderedDict()
_locks: dict[str, threading.Lock] = {}
_guard = threading.Lock()


def weights_fingerprint(lm: LoadedModel) -> str:
    """A cheap digest of the weights, so a model replaced under the same name or path is not mistaken for the old."""
    embedding = lm.model.get_input_embeddings().weight
    rows = embedding[:: max(1, embedding.shape[0] // 64)][:64].detach().float().cpu()
    return hashlib.sha256(rows.numpy().tobytes()).hexdigest()[:16]


def recording_key(lm: LoadedModel, prompts: Sequence[str], site: Site, token: Token, batch_size: int) -> str:
    """Names one recording: the model (identity and weights), where and how it reads, and the prompts in order."""
    described = {
        "format": FORMAT,
        "model": lm.identity.to_dict(),
        "weights": weights_fingerprint(lm),
        "device": lm.device.type,
        "site": site,
        "token": token,
        "batch_size": batch_size,
        "prompts": list(prompts),
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:32]


def cache_folder() -> Path:
    return default_cache_dir() / "recordings"


def cached_recording(
    lm: LoadedModel,
    prompts: Sequence[str],
    *,
    site: Site = "residual",
    token: Token = "mean",
    batch_size: int = 0,
    progress: ProgressCallback | None = None,
) -> torch.Tensor:
    """`record_activations(lm, prompts, …)`, from memory or disk when this model already recorded these prompts.

    Two callers asking for the same recording at once record it once: the second waits for the first.
    """
    batch_size = batch_size or default_batch_size(lm)
    key = recording_key(lm, prompts, site, token, batch_size)
    with _guard:
        lock = _locks.setdefault(key, threading.Lock())
    with lock:
        found = _from_memory(key) if key in _memory else _from_disk(key, len(prompts))
        if found is not None:
            (progress or no_progress)(1.0, f"{len(prompts)} prompts already recorded on this model")
            return found
        recorded = record_activations(
            lm, list(prompts), site=site, token=token, batch_size=batch_size, progress=progress
        )
        _remember(key, recorded)
        _write(key, recorded)
        return recorded


def is_cached(lm: LoadedModel, prompts: Sequence[str], *, site: Site, token: Token, batch_size: int = 0) -> bool:
    """Whether `cached_recording` would answer without a forward pass (for time estimates)."""
    key = recording_key(lm, prompts, site, token, batch_size or default_batch_size(lm))
    return key in _memory or (cache_folder() / f"{key}.safetensors").is_file()


def _from_memory(key: str) -> torch.Tensor:
    with _guard:
        _memory.move_to_end(key)
        return _memory[key]


def _bytes(recorded: torch.Tensor) -> int:
    return recorded.numel() * recorded.element_size()


def _remember(key: str, recorded: torch.Tensor) -> None:
    """Kept in memory when it fits; the least recently used go first."""
    if _bytes(recorded) > MEMORY_BYTES:
        return  # the disk copy serves it
    with _guard:
        _memory[key] = recorded
        while sum(_bytes(t) for t in _memory.values()) > MEMORY_BYTES:
            _memory.popitem(last=False)


def _from_disk(key: str, n_prompts: int) -> torch.Tensor | None:
    from safetensors.torch import load_file

    path = cache_folder() / f"{key}.safetensors"
    if not path.is_file():
        return None
    try:
        recorded = load_file(path)["activations"]
    except Exception:  # unreadable or cut short: record again, and overwrite it
        log.warning("ignoring an unreadable cached recording %s", path.name)
        return None
    if recorded.dtype != torch.float32 or recorded.ndim != 3 or recorded.shape[0] != n_prompts:
        log.warning("ignoring a cached recording of the wrong shape %s", path.name)
        return None
    os.utime(path)  # the newest used are the last evicted
    _remember(key, recorded)
    return recorded


def _write(key: str, recorded: torch.Tensor) -> None:
    """Written whole or not at all (a temporary file renamed), then the least recently used beyond `DISK_BYTES` go."""
    from safetensors.torch import save_file

    folder = cache_folder()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        partial = folder / f"{key}.{os.getpid()}.{threading.get_ident()}.partial"
        save_file({"activations": recorded.contiguous()}, str(partial))
        os.replace(partial, folder / f"{key}.safetensors")
        total = 0
        for path in sorted(folder.glob("*.safetensors"), key=lambda p: p.stat().st_mtime, reverse=True):
            total += path.stat().st_size
            if total > DISK_BYTES:
                path.unlink(missing_ok=True)
    except OSError:  # a read-only or full cache folder costs speed, not results
        log.warning("could not keep a recording in %s", folder, exc_info=True)


def forget_memory() -> None:
    """Drop the in-memory copies (tests; the disk copies stay)."""
    with _guard:
        _memory.clear()
