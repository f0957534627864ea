"""Tokenizers from a GGUF file's metadata, against transformers' own conversion."""
import importlib.util
import os

import pytest

from ultrametric_jax.tokenizer import encode, tokenizer_from_gguf

TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer"


def test_gguf_tokenizer_matches_transformers(smollm2_path):
    import transformers
    directory, name = os.path.split(smollm2_path)
    reference = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
    ours = tokenizer_from_gguf(smollm2_path)
    assert encode(ours, TEXT) == reference(TEXT, add_special_tokens=False)["input_ids"]


def test_missing_torch_is_named(monkeypatch, smollm2_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "torch" else real(name, *a))
    with pytest.raises(ValueError, match="GGUF reader needs PyTorch"):
        tokenizer_from_gguf(smollm2_path)
