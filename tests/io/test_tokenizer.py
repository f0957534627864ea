"""Tokenizers from a GGUF file's metadata, against pinned ids and the GGUF's own vocabulary."""
import importlib.util

import pytest

from ultrametric_jax.io.tokenizer import decode, encode, tokenizer_from_gguf

TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer"
# SmolLM2's GGUF tokenizer on TEXT, computed once with tokenizer_from_gguf and checked against
# the GGUF's vocabulary in test_ids_spell_the_text_in_the_gguf_vocabulary.
TEXT_IDS = [2068, 325, 28, 355, 441, 288, 325, 28, 338, 314, 260, 1962, 42, 198, 16189, 637,
            34818, 7644, 2347, 281, 260, 1945, 288, 6652]


def gpt2_byte_decoder() -> dict:
    """GPT-2's byte-level alphabet (closed form): printable character -> byte."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def test_gguf_tokenizer_encodes_pinned_ids_and_round_trips(smollm2_tokenizer):
    assert encode(smollm2_tokenizer, TEXT) == TEXT_IDS
    assert decode(smollm2_tokenizer, TEXT_IDS) == TEXT


def test_ids_spell_the_text_in_the_gguf_vocabulary(smollm2_path):
    """An independent oracle: the GGUF's token list, read by the gguf package, spells TEXT."""
    import gguf
    reader = gguf.GGUFReader(smollm2_path)
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    vocab = reader.fields["tokenizer.ggml.tokens"].contents()
    byte_of = gpt2_byte_decoder()
    spelled = bytes(byte_of[ch] for i in TEXT_IDS for ch in vocab[i])
    assert spelled.decode("utf-8") == TEXT


def test_missing_torch_is_named(monkeypatch, smollm2_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "torch" else real(name, *a))
    with pytest.raises(ValueError, match="GGUF reader needs PyTorch"):
        tokenizer_from_gguf(smollm2_path)
