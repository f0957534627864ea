"""ultrametric_jax: Llama Surgery in JAX/Flax.

Public API (imported lazily so that `import ultrametric_jax` stays cheap):
  LlamaConfig, SurgeryConfig            configuration
  load_pretrained, save_hf              checkpoints (HF safetensors, GGUF, own Orbax format)
  inject_topology, extract_routes       the surgery
"""
from __future__ import annotations

import importlib

from ultrametric_jax.errors import ConfigError
from ultrametric_jax.model.config import LlamaConfig
from ultrametric_jax.surgery.config import SurgeryConfig

_LAZY = {
    "LlamaForCausalLM": "ultrametric_jax.model.llama",
    "load_pretrained": "ultrametric_jax.io.checkpoints",
    "save_hf": "ultrametric_jax.io.checkpoints",
    "inject_topology": "ultrametric_jax.surgery.inject",
    "extract_routes": "ultrametric_jax.surgery.inject",
}

__all__ = ["ConfigError", "LlamaConfig", "SurgeryConfig", *_LAZY]
__version__ = "0.1.0"


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ultrametric_jax' has no attribute {name!r}")
