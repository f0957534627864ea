"""The on-disk format of a surgery export, shared by the JAX writer (export.py) and the PyTorch
reader (torch_surgery.py); imports neither JAX nor torch.

config.json carries the SurgeryConfig under SURGERY_CONFIG_KEY; ROUTER_FILE holds, per layer N,
model.layers.N.self_attn.router.{fc1,fc2}.{weight,bias} in torch layout ([out, in]). A
surgery with key selectors (key_rank > 0) also has SELECTOR_FILE: per layer N,
model.layers.N.self_attn.selector.{query_proj,key_proj} [heads, head dim, key_rank] and
model.layers.N.self_attn.selector.log_threshold [1] (float32).
"""
from __future__ import annotations

from typing import Optional

ROUTER_FILE = "router.safetensors"
SURGERY_CONFIG_KEY = "ultrametric_surgery"
EXPORT_INFO_KEY = "ultrametric_export"
ROUTER_PARAM_NAMES = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")
SELECTOR_FILE = "key_selectors.safetensors"
SELECTOR_PARAM_NAMES = ("query_proj", "key_proj", "log_threshold")


def selector_param_name(layer_idx: int, name: str) -> str:
    """Name of a key-selector tensor, e.g. model.layers.3.self_attn.selector.key_proj."""
    return f"model.layers.{layer_idx}.self_attn.selector.{name}"


def selector_shapes(config, surgery) -> dict[str, tuple]:
    """{selector tensor name: shape} for a model config (LlamaConfig or transformers')."""
    head_dim = getattr(config, "head_dim", None) or (config.hidden_size
                                                     // config.num_attention_heads)
    projection = (config.num_attention_heads, head_dim, surgery.key_rank)
    shapes = {"query_proj": projection, "key_proj": projection, "log_threshold": (1,)}
    return {selector_param_name(i, name): shapes[name]
            for i in range(config.num_hidden_layers) for name in SELECTOR_PARAM_NAMES}


def selector_shape_problem(shapes: dict, config, surgery) -> Optional[str]:
    """What is wrong with key-selector tensors of the given {name: shape}, or None."""
    return _shape_problem(shapes, selector_shapes(config, surgery), "key-selector tensor",
                          "the key selectors", "",
                          f"(heads, head dimension, key_rank = {surgery.key_rank})")


def _shape_problem(shapes: dict, expected: dict, item: str, whole: str, incomplete: str,
                   explained: str) -> Optional[str]:
    """The first of: tensors missing (`whole` lacks ...`incomplete`), tensors not expected, a
    tensor (`item`) of another shape than expected (`explained` says how it is made)."""
    missing = [name for name in expected if name not in shapes]
    if missing:
        return (f"{whole} lack {len(missing)} of {len(expected)} tensors, e.g. "
                f"{missing[0]}{incomplete}")
    extra = sorted(set(shapes) - set(expected))
    if extra:
        return f"unexpected {item}s: {extra[:4]}"
    for name, shape in expected.items():
        if tuple(shapes[name]) != shape:
            return f"{item} {name} has shape {tuple(shapes[name])}, expected {shape} {explained}"
    return None


def router_param_name(layer_idx: int, name: str) -> str:
    """HF-style name of a router tensor, e.g. model.layers.3.self_attn.router.fc1.weight."""
    return f"model.layers.{layer_idx}.self_attn.router.{name}"


def router_shapes(config, surgery) -> dict[str, tuple]:
    """{router tensor name: torch shape} for a model config (LlamaConfig or transformers')."""
    d = config.hidden_size
    out = config.num_attention_heads * surgery.num_levels * surgery.arity
    shapes = {"fc1.weight": (d, d), "fc1.bias": (d,), "fc2.weight": (out, d), "fc2.bias": (out,)}
    return {router_param_name(i, name): shapes[name]
            for i in range(config.num_hidden_layers) for name in ROUTER_PARAM_NAMES}


def router_shape_problem(shapes: dict, config, surgery) -> Optional[str]:
    """What is wrong with router tensors of the given {name: shape}, or None when they fit."""
    return _shape_problem(shapes, router_shapes(config, surgery), "router weight",
                          "the router weights", ": no complete ultrametric topology",
                          f"(H*L*p = {config.num_attention_heads}*{surgery.num_levels}*"
                          f"{surgery.arity})")
