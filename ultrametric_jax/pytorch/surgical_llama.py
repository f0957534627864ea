"""The surgical model in PyTorch: a transformers `LlamaForCausalLM` whose attention layers carry
the router and apply the hard ultrametric mask.

This is the only module of the package that imports torch (the optional `torch` extra).

Each attention layer keeps transformers' own q/k/v/o projections and rotary embedding and adds
`self_attn.router` (fc1: d -> d, exact GELU, fc2: d -> H*L*p, float32). A token's hard route
is the argmax child at every level; its cluster id at the cut level k = L - d_max packs the
first k digits base p (digit 0 most significant). Query i may attend key j when
    pos_j <= pos_i and (cluster_i == cluster_j or pos_j < sink_tokens or pos_i - pos_j < window)
with every query head using its own routes for queries and keys, and on top of that the
model's causal / padding mask. Attention runs with an explicit boolean mask, float32 scores
and softmax, whatever the model dtype.

A surgery with key selectors (key_rank > 0) narrows that mask, per query head h, to the keys
whose probability under the estimated scores (query_proj[h]^T q_i) . (key_proj[h]^T k_j)
(queries scaled, `key_rank` dimensions) passes exp(log_threshold), plus the row's most
probable key, its own key, and the sink + window.

Under generate() the cluster ids and positions of past keys ride along with the KV cache (a
token's cluster id depends only on that token's input to the layer), so decoding never
recomputes past routes; beam search and batch selection move them with the cache's rows.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

import transformers
from transformers.models.llama import modeling_llama

from ultrametric_jax.surgery.config import SurgeryConfig
from ultrametric_jax.io.export_format import (ROUTER_FILE, ROUTER_PARAM_NAMES, SELECTOR_FILE,
                                           SELECTOR_PARAM_NAMES, SURGERY_CONFIG_KEY,
                                           router_param_name, router_shape_problem,
                                           selector_param_name, selector_shape_problem)


class UltrametricRouter(nn.Module):
    """fc1 (d->d) -> exact GELU -> fc2 (d -> H*L*p); the math runs in float32 always."""

    def __init__(self, hidden_size: int, num_heads: int, levels: int, arity: int):
        super().__init__()
        self.num_heads, self.levels, self.arity = num_heads, levels, arity
        self.fc1 = nn.Linear(hidden_size, hidden_size, dtype=torch.float32)
        self.fc2 = nn.Linear(hidden_size, num_heads * levels * arity, dtype=torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B,S,d] (the layer's attention input) -> logits [B,H,S,L,p] in float32."""
        x = x.to(torch.float32)
        h = F.gelu(F.linear(x, self.fc1.weight.float(), self.fc1.bias.float()), approximate="none")
        logits = F.linear(h, self.fc2.weight.float(), self.fc2.bias.float())
        b, s, _ = x.shape
        return logits.view(b, s, self.num_heads, self.levels, self.arity).permute(0, 2, 1, 3, 4)

    def cluster_ids(self, x: torch.Tensor, cut_level: int) -> torch.Tensor:
        """Hard cluster ids [B,H,S] (int64) at the cut level: the first k argmax digits, base p."""
        digits = self.forward(x).argmax(dim=-1)[..., :cut_level]
        weights = self.arity ** torch.arange(cut_level - 1, -1, -1, device=digits.device)
        return (digits * weights).sum(dim=-1)


def ultrametric_allowed(q_clusters, k_clusters, q_pos, k_pos, *, window: int, sink_tokens: int):
    """Hard allowed mask [B,H,Sq,Sk] from cluster ids [B,H,S*] and positions [B,S*]."""
    qp, kp = q_pos[:, None, :, None], k_pos[:, None, None, :]
    same = q_clusters[..., :, None] == k_clusters[..., None, :]
    return (kp <= qp) & (same | (kp < sink_tokens) | (qp - kp < window))


class KeySelector(nn.Module):
    """The fitted key choice of one layer: query_proj, key_proj [H, D, r] and log_threshold
    [1] (buffers)."""

    def __init__(self, heads: int, head_dim: int, rank: int):
        super().__init__()
        for name in ("query_proj", "key_proj"):
            self.register_buffer(name, torch.zeros(heads, head_dim, rank, dtype=torch.float32))
        self.register_buffer("log_threshold", torch.zeros(1, dtype=torch.float32))

    def forward(self, q, k, causal, scale: float) -> torch.Tensor:
        """bool [B,H,Sq,Sk]: of the pairs in causal, those whose probability under the
        projected scores passes the threshold, and each row's most probable key. q [B,H,Sq,D]
        (unscaled), k [B,G,Sk,D]."""
        groups = q.shape[1] // k.shape[1]
        qp = torch.einsum("bhsd,hdr->bhsr", q.to(torch.float32) * scale,
                          self.query_proj.to(q.device))
        kp = torch.einsum("bhsd,hdr->bhsr", k.to(torch.float32).repeat_interleave(groups, dim=1),
                          self.key_proj.to(q.device))
        estimate = torch.matmul(qp, kp.transpose(-1, -2))
        logp = torch.log_softmax(estimate.masked_fill(~causal, float("-inf")), dim=-1)
        top = logp >= logp.max(dim=-1, keepdim=True).values
        return causal & ((logp >= self.log_threshold.to(q.device)) | top)


def masked_attention(q, k, v, allowed, scale: float):
    """q [B,H,Sq,D], k/v [B,G,Sk,D], allowed bool [B,H,Sq,Sk] -> (out [B,Sq,H,D], probs).

    Scores and softmax in float32; query head h reads kv head h // (H // G). A row with no
    allowed key (a padding query) gets a uniform, finite average instead of NaN.
    """
    groups = q.shape[1] // k.shape[1]
    k = k.to(torch.float32).repeat_interleave(groups, dim=1)
    v = v.to(torch.float32).repeat_interleave(groups, dim=1)
    scores = torch.matmul(q.to(torch.float32), k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed, torch.finfo(torch.float32).min)
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, v).transpose(1, 2), probs


def _model_mask_allows(attention_mask, q_len: int, k_len: int) -> Optional[torch.Tensor]:
    """The model's own 4-D mask (causal + padding) as bool [B,1,Sq,Sk], or None when absent."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 4:
        raise TypeError(
            "surgical attention needs a 4-D tensor attention mask, got "
            f"{type(attention_mask).__name__}; load the model with attn_implementation='eager'")
    mask = attention_mask[..., -q_len:, :k_len]
    return mask if mask.dtype == torch.bool else mask == 0


class _PastKeyRoutes:
    """Cluster ids [B,H,T] and positions [B,T] of the keys a transformers Cache holds, per layer.

    Stored on the cache object itself and kept in step with it: beam search's reorder and
    batch selection/expansion move these rows too, a cropped cache keeps its prefix, and a
    cache whose past keys were not written by the surgical model is refused.
    """

    ATTR = "_ultrametric_past_key_routes"
    _ROW_OPS = {
        "reorder_cache": lambda t, idx: t.index_select(0, idx.to(t.device)),
        "batch_select_indices": lambda t, idx: t[idx],
        "batch_repeat_interleave": lambda t, n: t.repeat_interleave(n, dim=0),
    }

    def __init__(self):
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def of(cls, cache) -> "_PastKeyRoutes":
        store = getattr(cache, cls.ATTR, None)
        if store is None:
            store = cls()
            setattr(cache, cls.ATTR, store)
            store._follow(cache)
        return store

    def _follow(self, cache) -> None:
        for name, op in self._ROW_OPS.items():
            original = getattr(cache, name, None)
            if original is None:
                continue

            def moved(arg, _original=original, _op=op):
                _original(arg)
                self.layers = {i: (_op(c, arg), _op(p, arg)) for i, (c, p) in self.layers.items()}

            setattr(cache, name, moved)
        original_reset = getattr(cache, "reset", None)
        if original_reset is not None:
            def reset(_original=original_reset):
                _original()
                self.layers = {}
            cache.reset = reset

    def extend(self, layer_idx, past_len, clusters, positions, key_len):
        """Append this step's routes after the first `past_len` stored ones; returns routes for
        all `key_len` key slots (slots not yet written, as in a static cache, never match)."""
        if past_len:
            old = self.layers.get(layer_idx)
            if old is None or old[0].shape[-1] < past_len or old[0].shape[0] != clusters.shape[0]:
                known = 0 if old is None else old[0].shape[-1]
                raise RuntimeError(
                    f"the KV cache holds {past_len} past keys of layer {layer_idx} but the "
                    f"cluster ids of only {known} are known: a surgical model's cache must be "
                    "filled by the surgical model itself")
            clusters = torch.cat([old[0][..., :past_len], clusters], dim=-1)
            positions = torch.cat([old[1][..., :past_len], positions], dim=-1)
        self.layers[layer_idx] = (clusters, positions)
        missing = key_len - clusters.shape[-1]
        if missing < 0:
            raise RuntimeError(
                f"layer {layer_idx}'s cache returned {key_len} keys for {clusters.shape[-1]} "
                "routed tokens; sliding-window caches are not supported by the surgical model")
        if missing:
            clusters = F.pad(clusters, (0, missing), value=-1)
            positions = F.pad(positions, (0, missing), value=torch.iinfo(positions.dtype).max)
        return clusters, positions


class SurgicalLlamaAttention(modeling_llama.LlamaAttention):
    """transformers' LlamaAttention plus a router and the hard ultrametric mask."""

    def __init__(self, config, layer_idx: int, surgery: SurgeryConfig):
        super().__init__(config, layer_idx)
        self.surgery = surgery
        self.router = UltrametricRouter(config.hidden_size, config.num_attention_heads,
                                        surgery.num_levels, surgery.arity)
        self.selector = (KeySelector(config.num_attention_heads, self.head_dim, surgery.key_rank)
                         if surgery.key_rank else None)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None,
                past_key_values=None, past_key_value=None, position_ids=None, **kwargs):
        # The cache keyword changed across transformers versions; accept each spelling.
        cache = next((c for c in (cache, past_key_values, past_key_value) if c is not None), None)
        bsz, q_len, _ = hidden_states.shape
        shape = (bsz, q_len, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)

        past_len = 0 if cache is None else int(cache.get_seq_length(self.layer_idx))
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + q_len, device=q.device)
        q_pos = position_ids.reshape(-1, q_len).expand(bsz, q_len).to(torch.long)
        q_clusters = self.router.cluster_ids(hidden_states, self.surgery.cut_level)
        if cache is None:
            k_clusters, k_pos = q_clusters, q_pos
        else:
            cache_kwargs = {"sin": sin, "cos": cos, "cache_position": kwargs.get("cache_position")}
            k, v = cache.update(k, v, self.layer_idx, cache_kwargs)
            k_clusters, k_pos = _PastKeyRoutes.of(cache).extend(
                self.layer_idx, past_len, q_clusters, q_pos, k.shape[-2])

        allowed = ultrametric_allowed(q_clusters, k_clusters, q_pos, k_pos,
                                      window=self.surgery.window,
                                      sink_tokens=self.surgery.sink_tokens)
        model_mask = _model_mask_allows(attention_mask, q_len, k.shape[-2])
        if model_mask is not None:
            allowed = allowed & model_mask
        else:  # no mask given: plain causality over cache slots
            slots = torch.arange(k.shape[-2], device=q.device)
            q_slots = past_len + torch.arange(q_len, device=q.device)
            model_mask = (slots[None, :] <= q_slots[:, None])[None, None]
            allowed = allowed & model_mask
        if self.selector is not None:
            qp, kp = q_pos[:, None, :, None], k_pos[:, None, None, :]
            causal = (kp <= qp) & model_mask
            local = (kp < self.surgery.sink_tokens) | (qp - kp < self.surgery.window) | (kp == qp)
            allowed = allowed & (self.selector(q, k, causal, self.scaling) | local)
        out, probs = masked_attention(q, k, v, allowed, self.scaling)
        out = out.reshape(bsz, q_len, -1).to(hidden_states.dtype)
        return self.o_proj(out), probs


def attach_surgery(model, surgery: SurgeryConfig, router_state: dict,
                   selector_state: Optional[dict] = None):
    """Swap every attention layer of a transformers LlamaForCausalLM, in place, for a surgical one
    with the given router weights (HF names, see router_param_name) and, for a surgery with
    key_rank > 0, key selectors (selector_param_name); returns the model."""
    config = model.config
    problem = router_shape_problem({k: v.shape for k, v in router_state.items()}, config, surgery)
    if problem:
        raise ValueError(problem)
    if surgery.key_rank:
        if selector_state is None:
            raise ValueError(f"the surgery has key selectors (key_rank={surgery.key_rank}) but "
                             "no selector tensors were given")
        problem = selector_shape_problem({k: tuple(v.shape) for k, v in selector_state.items()},
                                         config, surgery)
        if problem:
            raise ValueError(problem)
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")  # the surgical attention needs a 4-D tensor mask
    else:
        config._attn_implementation = "eager"
    for i, layer in enumerate(model.model.layers):
        old = layer.self_attn
        with torch.device("meta"):
            new = SurgicalLlamaAttention(config, i, surgery)
        state = dict(old.state_dict())
        device = old.q_proj.weight.device
        state.update({f"router.{n}": router_state[router_param_name(i, n)].to(
            device=device, dtype=torch.float32) for n in ROUTER_PARAM_NAMES})
        if surgery.key_rank:
            state.update({f"selector.{n}": selector_state[selector_param_name(i, n)].to(
                device=device, dtype=torch.float32) for n in SELECTOR_PARAM_NAMES})
        new.load_state_dict(state, strict=True, assign=True)
        new.train(old.training)
        layer.self_attn = new
    return model


def read_surgery_config(hf_dir: str) -> SurgeryConfig:
    """The SurgeryConfig stored in an exported directory's config.json."""
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"not a model directory: {path} does not exist")
    with open(path) as f:
        section = json.load(f).get(SURGERY_CONFIG_KEY)
    if section is None:
        raise ValueError(f"{path} has no {SURGERY_CONFIG_KEY!r} section: {hf_dir} is a plain "
                         "model, not an ultrametric surgery export")
    return SurgeryConfig.from_dict(section)


def load_surgical_llama(hf_dir: str, dtype=torch.float32):
    """Load an exported surgery directory as a transformers LlamaForCausalLM (evaluation mode)
    whose attention applies the hard ultrametric mask; works with generate() and its cache."""
    from safetensors.torch import load_file

    if not os.path.isdir(hf_dir):
        raise FileNotFoundError(f"export directory {hf_dir} does not exist")
    surgery = read_surgery_config(hf_dir)
    router_path = os.path.join(hf_dir, ROUTER_FILE)
    if not os.path.isfile(router_path):
        raise FileNotFoundError(f"missing router weights: {router_path} does not exist")
    dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    model = modeling_llama.LlamaForCausalLM.from_pretrained(
        hf_dir, attn_implementation="eager", **{dtype_kw: dtype})
    selectors = None
    if surgery.key_rank:
        selector_path = os.path.join(hf_dir, SELECTOR_FILE)
        if not os.path.isfile(selector_path):
            raise FileNotFoundError(f"missing key selectors: {selector_path} does not exist "
                                    f"(the surgery has key_rank={surgery.key_rank})")
        selectors = load_file(selector_path)
    attach_surgery(model, surgery, load_file(router_path), selectors)
    return model.eval()
