"""A float64 numpy forward of a Llama given as a Hugging Face state dict (the tests' oracle for
masked attention): every attention row is restricted to the mask that `mask_of` picks from the
head's float64 scores."""
from __future__ import annotations

import math

import numpy as np


def llama_ce(weights: dict, arch: dict, input_ids, real, mask_of, with_qk: bool = False):
    """(CE sum, count) of next-token prediction over real targets, float64.

    weights: HF names -> arrays; arch: hidden_size, num_attention_heads, num_key_value_heads,
    num_hidden_layers, rms_norm_eps, rope_theta; input_ids [B, S]; real [B, S] bool (the real
    tokens); mask_of(layer, head, scores [S, S], base [S, S] bool) -> bool [S, S], where base is
    causal over real keys (row i: keys j <= i that are real); with_qk: mask_of(layer, head,
    scores, base, q, k), q [S, hd] the head's queries scaled so that q @ k.T is the scores and
    k [S, hd] its kv head's keys (RoPE applied to both)."""
    d, heads, kv = arch["hidden_size"], arch["num_attention_heads"], arch["num_key_value_heads"]
    hd = d // heads
    w = {k: v.astype(np.float64) for k, v in weights.items()}

    def norm(x, g):
        return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + arch["rms_norm_eps"]) * g

    seq = input_ids.shape[1]
    inv = 1.0 / arch["rope_theta"] ** (np.arange(0, hd, 2) / hd)
    ang = np.arange(seq)[:, None] * inv[None]
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))

    def rope(x):                          # [B, S, N, hd]
        rot = np.concatenate([-x[..., hd // 2:], x[..., :hd // 2]], -1)
        return x * cos[None, :, None] + rot * sin[None, :, None]

    total = count = 0.0
    pos = np.arange(seq)
    for b in range(input_ids.shape[0]):
        base = (pos[None, :] <= pos[:, None]) & real[b][None, :]
        x = w["model.embed_tokens.weight"][input_ids[b]][None]
        for i in range(arch["num_hidden_layers"]):
            p = f"model.layers.{i}."
            h = norm(x, w[p + "input_layernorm.weight"])
            q = rope((h @ w[p + "self_attn.q_proj.weight"].T).reshape(1, seq, heads, hd))
            k = rope((h @ w[p + "self_attn.k_proj.weight"].T).reshape(1, seq, kv, hd))
            v = (h @ w[p + "self_attn.v_proj.weight"].T).reshape(1, seq, kv, hd)
            out = np.zeros((seq, heads, hd))
            for head in range(heads):
                g = head // (heads // kv)
                s = q[0, :, head] @ k[0, :, g].T / math.sqrt(hd)
                extra = (q[0, :, head] / math.sqrt(hd), k[0, :, g]) if with_qk else ()
                s = np.where(mask_of(i, head, s, base, *extra), s, np.finfo(np.float64).min)
                prob = np.exp(s - s.max(-1, keepdims=True))
                out[:, head] = (prob / prob.sum(-1, keepdims=True)) @ v[0, :, g]
            x = x + out.reshape(1, seq, d) @ w[p + "self_attn.o_proj.weight"].T
            h = norm(x, w[p + "post_attention_layernorm.weight"])
            gate = h @ w[p + "mlp.gate_proj.weight"].T
            x = x + ((gate / (1 + np.exp(-gate))) * (h @ w[p + "mlp.up_proj.weight"].T)) \
                @ w[p + "mlp.down_proj.weight"].T
        logits = norm(x, w["model.norm.weight"])[0] @ w["lm_head.weight"].T
        logp = logits - logits.max(-1, keepdims=True)
        logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
        nll = -logp[np.arange(seq - 1), input_ids[b, 1:]]
        total += float((nll * real[b, 1:]).sum())
        count += float(real[b, 1:].sum())
    return total, count
