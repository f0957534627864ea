"""Topology injection into a loaded Llama, trainable-state selection and route extraction.

    model = load_pretrained(path)
    inject_topology(model, SurgeryConfig(...), nnx.Rngs(params=0, gumbel=1))
    model.train(); set_tau(model, 0.5)
    logits, aux = forward_with_aux(model, input_ids)     # aux["balance_loss"], aux["density"]
    optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=trainable_filter())

Only RouterParam variables are trainable; the base parameters are the loaded ones, shared,
untouched. After injection the model is in evaluation mode and, thanks to the collapse
initialisation, computes exactly the base model's logits.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from ultrametric_jax.surgery.attention import (AttentionFn, SurgicalAttention, attention_fn,
                                              capture_aux)
from ultrametric_jax.surgery.config import SurgeryConfig
from ultrametric_jax.surgery.router import RouterParam


def surgical_layers(model) -> list[SurgicalAttention]:
    """The surgical attention modules of `model`, in layer order (empty before injection)."""
    return [layer.self_attn for layer in model.model.layers
            if isinstance(layer.self_attn, SurgicalAttention)]


def _require_surgery(model) -> list[SurgicalAttention]:
    layers = surgical_layers(model)
    if len(layers) != len(model.model.layers):
        raise ValueError("the model carries no ultrametric topology: call inject_topology first")
    return layers


def inject_topology(model, surgery_config: SurgeryConfig, rngs: nnx.Rngs, *,
                    attention: Optional[AttentionFn] = None):
    """Replaces every layer's self_attn, in place, by a SurgicalAttention that holds the same
    q/k/v/o modules plus a collapse-initialised router. Returns the model.

    rngs: its "params" stream initialises the routers' fc1, its "gumbel" stream (or the
    default one) seeds each layer's Gumbel noise. attention: the evaluation attention function
    of the hard topology (None: the masked dense path; see set_attention_impl).
    """
    if not isinstance(surgery_config, SurgeryConfig):
        raise TypeError(f"surgery_config must be a SurgeryConfig, got {type(surgery_config)}")
    if surgical_layers(model):
        raise ValueError("the model already carries an ultrametric topology")
    for layer in model.model.layers:
        layer.self_attn = SurgicalAttention(layer.self_attn, surgery_config, rngs=rngs,
                                            attention=attention)
    return model


def trainable_filter():
    """The nnx filter of the state a surgery run trains (nnx.Optimizer(..., wrt=...),
    nnx.DiffState(0, ...), nnx.split(model, ...))."""
    return RouterParam


def router_state(model) -> nnx.State:
    """The trainable (router) state of the model."""
    return nnx.state(model, RouterParam)


def set_tau(model, tau) -> None:
    """Sets the Gumbel temperature of every surgical layer (a float or a scalar array)."""
    for attn in _require_surgery(model):
        attn.tau[...] = jnp.asarray(tau, jnp.float32)


def set_attention_impl(model, impl: str, **kernel_options) -> None:
    """Evaluation backend: "dense" (llama.masked_attention) or "kernel"
    (pallas_kernels.routed_attention, for calls with the default positions, no padding mask and
    no cache; kernel_options such as layout="sorted", backend="gpu", interpret=True or block
    sizes are passed on to it; the default layout="auto" runs learned, scattered routes on the
    cluster-sorted layout). With mesh=<jax.sharding.Mesh> the kernels run per device under
    shard_map (batch over data and fsdp, heads over tensor), as a model placed by
    sharding.shard_module needs."""
    fn = attention_fn(impl, **kernel_options)
    for attn in _require_surgery(model):
        attn.attention = fn


@contextlib.contextmanager
def evaluation_mode(model):
    """Within the context the surgical layers take the evaluation (argmax, noise-free) path;
    each layer's previous mode is restored afterwards."""
    layers = _require_surgery(model)
    modes = [attn.deterministic for attn in layers]
    for attn in layers:
        attn.deterministic = True
    try:
        yield model
    finally:
        for attn, mode in zip(layers, modes):
            attn.deterministic = mode


def forward_with_aux(model, input_ids, attention_mask=None, *, positions=None,
                     extras=()):
    """(logits [B,S,V] float32, aux) in the model's current mode.

    aux: balance_loss (mean over layers of L_bal), density / tree_density (fraction of causal
    pairs between real tokens allowed, overall), per layer balance_loss_per_layer,
    density_per_layer, tree_density_per_layer [layers], and clusters [layers, B, H, S] (int32
    cluster ids at the cut level). In training mode also soft_density (and _per_layer: the
    differentiable density of the bridged masks, equal in value to the hard one) and, with
    extras=("recall",), recall (and _per_layer): the attention-recall loss of every layer; with
    extras=("digits",), digits [layers, B, H, S, L] (int32 hard route digits, level 0 the root).
    """
    layers = _require_surgery(model)
    logits, records = capture_aux(
        lambda m: m(input_ids, positions=positions, attention_mask=attention_mask), model,
        layers, extras=extras)
    per_layer = {key: jnp.stack([r[key] for r in records]) for key in records[0]}
    aux = {key: per_layer.pop(key) for key in ("clusters", "digits") if key in per_layer}
    for key, values in per_layer.items():
        aux[key] = jnp.mean(values)
        aux[key + "_per_layer"] = values
    return logits, aux


@contextlib.contextmanager
def base_model_mode(model):
    """Within the context every surgical layer computes the base model's own attention (plain
    causal softmax, routers unused): the frozen teacher of output distillation, from the same
    parameters, with no second copy of the model."""
    layers = _require_surgery(model)
    for attn in layers:
        attn.as_base = True
    try:
        yield model
    finally:
        for attn in layers:
            attn.as_base = False


@dataclasses.dataclass
class Routes:
    """Hard routes of a batch: cluster ids at the cut level and the attention density."""
    cluster_ids: jax.Array          # int32 [layers, B, H, S]
    density_per_layer: jax.Array    # [layers] fraction of causal pairs allowed (tree+sink+window)
    tree_density_per_layer: jax.Array  # [layers] fraction allowed by the tree alone
    density: jax.Array              # scalar, over all layers
    tree_density: jax.Array         # scalar, over all layers
    digits: Optional[jax.Array] = None  # int32 [layers, B, H, S, L] when asked for (digits=True)


@nnx.jit(static_argnums=4)
def _route_aux(model, input_ids, attention_mask, positions, extras):
    return forward_with_aux(model, input_ids, attention_mask, positions=positions,
                            extras=extras)[1]


def extract_routes(model, input_ids, attention_mask=None, *, positions=None,
                   digits: bool = False) -> Routes:
    """The evaluation (argmax, noise-free) routes of every layer (compiled); the mode of the
    model is restored afterwards. digits=True also returns the whole digit strings (the tree
    distance of two tokens is L minus the length of their shared prefix), from the same
    forward pass as the cluster ids."""
    with evaluation_mode(model):
        aux = _route_aux(model, jnp.asarray(input_ids), attention_mask, positions,
                         ("digits",) if digits else ())
    return Routes(cluster_ids=aux["clusters"], density_per_layer=aux["density_per_layer"],
                  tree_density_per_layer=aux["tree_density_per_layer"],
                  density=aux["density"], tree_density=aux["tree_density"],
                  digits=aux.get("digits"))
