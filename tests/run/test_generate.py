"""KV-cache decoding: equals full recomputation and transformers' greedy generate."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import build_hf_llama, jit_forward, rel_err
from ultrametric_jax import load_pretrained
from ultrametric_jax.errors import ConfigError
from ultrametric_jax.run import generate as generate_module
from ultrametric_jax.run.generate import CACHE_BUCKET, generate, left_pad, select_token

pytestmark = pytest.mark.usefixtures("highest_precision")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    hf = build_hf_llama(num_attention_heads=4, num_key_value_heads=2, seed=3)
    path = tmp_path_factory.mktemp("gen") / "hf"
    hf.save_pretrained(path)
    return hf, load_pretrained(str(path))


def naive_greedy(forward, prompt, steps):
    """Greedy decoding by recomputing the whole sequence every step (no cache).

    The sequence is right-padded to a fixed width (one compile); causality makes the padding
    after the last token irrelevant to its logits.
    """
    seq, chosen_logits = list(prompt), []
    width = len(prompt) + steps
    for _ in range(steps):
        logits = forward(np.asarray([seq + [0] * (width - len(seq))]))[0, len(seq) - 1]
        chosen_logits.append(logits)
        seq.append(int(np.argmax(logits)))
    return np.asarray(seq[len(prompt):]), np.stack(chosen_logits)


def test_cache_decoding_equals_full_recomputation(tiny):
    _, model = tiny
    prompt = [5, 17, 3, 88, 41, 2, 9]
    tokens, logits = generate(model, [prompt], 12, return_logits=True)
    ref_tokens, ref_logits = naive_greedy(jit_forward(model), prompt, 12)
    np.testing.assert_array_equal(tokens[0], ref_tokens)
    assert rel_err(logits[0], ref_logits) <= 1e-5


def test_greedy_matches_transformers_generate(tiny):
    hf, model = tiny
    prompt = [[7, 1, 60, 22, 13, 4]]
    with torch.no_grad():
        ref = hf.generate(torch.tensor(prompt), max_new_tokens=16, do_sample=False,
                          min_new_tokens=16, pad_token_id=0)[0, 6:].numpy()
    np.testing.assert_array_equal(generate(model, prompt, 16)[0], ref)


def test_left_padded_batch_equals_single_prompts(tiny):
    _, model = tiny
    prompts = [[4, 8, 15, 16, 23, 42], [1, 2], [77, 3, 9, 50]]
    batch, logits = generate(model, prompts, 6, return_logits=True)
    for row, prompt in enumerate(prompts):
        alone, alone_logits = generate(model, [prompt], 6, return_logits=True)
        np.testing.assert_array_equal(batch[row], alone[0])
        assert rel_err(logits[row], alone_logits[0]) <= 1e-5
    ids, mask = left_pad(prompts, pad_id=0)
    assert ids.shape == (3, 6) and mask.sum(1).tolist() == [6, 2, 4]


def test_prompt_widths_in_one_bucket_share_a_compile(tiny, monkeypatch, caplog):
    import logging
    _, model = tiny
    monkeypatch.setattr(generate_module, "_COMPILED", {})   # fresh jitted functions

    def prefill_compiles():
        return sum("Compiling jit(prefill)" in r.getMessage() for r in caplog.records)

    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        generate(model, [[5, 6, 7]], 4)
        generate(model, [list(range(1, CACHE_BUCKET))], 4)
        assert prefill_compiles() == 1
        generate(model, [list(range(1, CACHE_BUCKET + 2))], 4)  # the next bucket
        assert prefill_compiles() == 2
    ids, mask = left_pad([[1, 2], [3]], multiple=CACHE_BUCKET)
    assert ids.shape == (2, CACHE_BUCKET) and mask.sum(1).tolist() == [2, 1]


def test_kv_cache_overflow_is_refused(tiny):
    _, model = tiny
    cache = model.init_cache(1, 4)
    with pytest.raises(ValueError, match="6 new tokens do not fit in a KV cache of length 4"):
        model(jnp.arange(6)[None], cache=cache)


def test_eos_stops_and_repeats(tiny):
    _, model = tiny
    free = generate(model, [[3, 4, 5]], 8)[0]
    eos = int(free[2])
    out = generate(model, [[3, 4, 5]], 8, eos_token_id=eos)[0]
    first = list(out).index(eos)
    np.testing.assert_array_equal(out[: first + 1], free[: first + 1])
    assert (out[first:] == eos).all()


@pytest.mark.parametrize("temperature,top_k", [(0.0, None), (1.0, 4)])
def test_device_loop_equals_host_loop(tiny, temperature, top_k):
    """Without logits the whole decode runs in one on-device loop; with them, one host step
    per token (checked against full recomputation above): the same tokens, EOS included."""
    _, model = tiny
    prompts = [[4, 8, 15, 16, 23, 42], [1, 2], [77, 3, 9, 50]]
    kwargs = dict(temperature=temperature, top_k=top_k, seed=5)
    free, _ = generate(model, prompts, 10, return_logits=True, **kwargs)
    eos = int(free[1, 3])                      # row 1 stops at step 3 at the latest
    host, _ = generate(model, prompts, 10, eos_token_id=eos, return_logits=True, **kwargs)
    device = generate(model, prompts, 10, eos_token_id=eos, **kwargs)
    np.testing.assert_array_equal(device, host)
    np.testing.assert_array_equal(generate(model, prompts, 10, **kwargs), free)
    assert (device[1, list(device[1]).index(eos):] == eos).all()


def test_padded_width_equals_single_prompts(tiny):
    """Left padding beyond the longest prompt (a shared width across calls) changes nothing:
    every row decodes as it does alone, by full recomputation."""
    _, model = tiny
    forward = jit_forward(model)
    prompts = [[4, 8, 15, 16, 23, 42], [1, 2], [77, 3, 9, 50]]
    padded = generate(model, prompts, 8, width=3 * CACHE_BUCKET - 5)
    for row, prompt in zip(padded, prompts):
        np.testing.assert_array_equal(row, naive_greedy(forward, prompt, 8)[0])
    ids, mask = left_pad(prompts, multiple=CACHE_BUCKET, width=3 * CACHE_BUCKET - 5)
    assert ids.shape == (3, 3 * CACHE_BUCKET) and mask.sum() == 12
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ConfigError, match="width must be a whole number >= 1"):
            generate(model, prompts, 4, width=bad)


def test_sampling_is_seeded(tiny):
    _, model = tiny
    a = generate(model, [[3, 4, 5]], 10, temperature=1.0, seed=1)
    b = generate(model, [[3, 4, 5]], 10, temperature=1.0, seed=1)
    c = generate(model, [[3, 4, 5]], 10, temperature=1.0, seed=2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    greedy = generate(model, [[3, 4, 5]], 10)
    np.testing.assert_array_equal(generate(model, [[3, 4, 5]], 10, temperature=0.7, top_k=1),
                                  greedy)


@pytest.mark.parametrize("temperature,top_k", [(1.0, None), (0.5, None), (1.5, 3)])
def test_sampling_distribution(temperature, top_k):
    """Empirical frequencies of select_token match softmax(logits / T) restricted to top-k."""
    logits = jnp.asarray([[2.0, 1.0, 0.5, 0.0, -1.0]])
    n = 40000
    keys = jax.random.split(jax.random.PRNGKey(0), n)
    draws = np.asarray(jax.vmap(lambda k: select_token(logits, k, temperature, top_k))(keys))[:, 0]
    freq = np.bincount(draws, minlength=5) / n
    z = np.asarray(logits[0], np.float64) / temperature
    if top_k is not None:
        z = np.where(z >= np.sort(z)[-top_k], z, -np.inf)
    expected = np.exp(z - z.max())
    expected /= expected.sum()
    np.testing.assert_allclose(freq, expected, atol=0.01)


def test_bad_arguments(tiny):
    _, model = tiny
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        generate(model, [[1]], 2, temperature=-1.0)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1, got 0"):
        generate(model, [[1]], 0)
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[]], 2)


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=float("nan")), "temperature must be >= 0 and finite, got nan"),
    (dict(temperature=float("inf")), "temperature must be >= 0 and finite, got inf"),
    (dict(temperature=1.0, top_k=0), r"top_k must be a whole number >= 1 \(or None: no limit\), "
                                     "got 0"),
    (dict(temperature=1.0, top_k=-4), "top_k must be a whole number >= 1"),
], ids=["nan", "inf", "top_k_0", "top_k_negative"])
def test_sampling_settings_that_cannot_decode_are_refused(tiny, kwargs, message):
    _, model = tiny
    with pytest.raises(ConfigError, match=message):
        generate(model, [[1, 2]], 2, **kwargs)


def test_prompt_beyond_the_context_is_refused(tiny):
    _, model = tiny
    context = model.config.max_position_embeddings
    assert context == 128
    with pytest.raises(ConfigError, match=r"the prompt has 129 tokens, more than the model's "
                       r"context of 128 tokens"):
        generate(model, [[1] * 3, [2] * 129], 1)
    with pytest.raises(ConfigError, match=r"the prompt \(100 tokens\) plus 29 new tokens exceed "
                       r"the model's context of 128 tokens; ask for at most 28 new tokens"):
        generate(model, [[3] * 100], 29)
    # Exactly filling the context is fine, and equals recomputation without a cache.
    prompt = list(np.random.default_rng(2).integers(1, 96, 120))
    tokens = generate(model, [prompt], 8)[0]
    ref, _ = naive_greedy(jit_forward(model), prompt, 8)
    np.testing.assert_array_equal(tokens, ref)


# ----------------------------------------------------------------------------- real model

@pytest.mark.slow
def test_smollm2_greedy_matches_transformers(smollm2_jax, smollm2_forward, smollm2_torch,
                                             smollm2_tokenizer):
    prompt = smollm2_tokenizer.encode("To be, or not to be, that is the question:").ids
    with torch.no_grad():
        ref = smollm2_torch.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32,
                                     do_sample=False)[0, len(prompt):].numpy()
    tokens, logits = generate(smollm2_jax, [prompt], 32, return_logits=True)
    np.testing.assert_array_equal(tokens[0], ref)
    # KV-cache logits equal recomputing the full sequence.
    full = smollm2_forward(np.asarray([prompt + list(tokens[0][:-1])]))[0, len(prompt) - 1:]
    assert rel_err(logits[0], full) <= 1e-4


def test_generate_with_llama3_rope(tmp_path):
    """A config holding a rope-scaling dict (an unhashable static field) decodes correctly."""
    hf = build_hf_llama(max_position_embeddings=64, rope_parameters={
        "rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8, "rope_theta": 10000.0})
    hf.save_pretrained(tmp_path / "hf")
    model = load_pretrained(str(tmp_path / "hf"))
    prompt = [9, 8, 7, 6, 5, 4, 3, 2, 1, 10]
    tokens = generate(model, [prompt], 6)[0]
    ref, _ = naive_greedy(jit_forward(model), prompt, 6)
    np.testing.assert_array_equal(tokens, ref)
