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
    expected = selector_shapes(config, surgery)
    missing = [name for name in expected if name not in shapes]
    if missing:
        return (f"the key selectors lack {len(missing)} of {len(expected)} tensors, e.g. "
                f"{missing[0]}")
    extra = sorted(set(shapes) - set(expected))
    if extra:
        return f"unexpected key-selector tensors: {extra[:4]}"
    for name, shape in expected.items():
        if tuple(shapes[name]) != shape:
            return (f"key-selector tensor {name} has shape {tuple(shapes[name])}, expected "
                    f"{shape} (heads, head dimension, key_rank = {surgery.key_rank})")
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
    expected = router_shapes(config, surgery)
    missing = [name for name in expected if name not in shapes]
    if missing:
        return (f"the router weights lack {len(missing)} of {len(expected)} tensors, e.g. "
                f"{missing[0]}: no complete ultrametric topology")
    extra = sorted(set(shapes) - set(expected))
    if extra:
        return f"unexpected router weights: {extra[:4]}"
    for name, shape in expected.items():
        if tuple(shapes[name]) != shape:
            return (f"router weight {name} has shape {tuple(shapes[name])}, expected {shape} "
                    f"(H*L*p = {config.num_attention_heads}*{surgery.num_levels}*"
                    f"{surgery.arity})")
    return None
