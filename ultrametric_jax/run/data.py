"""The data pipeline on Grain: tokenisation, packing, each process's shard, a resumable iterator.

Every process lists the corpus and applies the hashed document split (run/data_corpus.py), then
tokenises and packs only its own shard of the training documents (every process_count-th
document from its process_index on, Grain's ShardOptions) and the whole validation split.
Documents are tokenised by a Grain map, joined with EOS and cut into fixed-length rows that each
start with BOS; the tail is padded and masked. The training iterator is a Grain dataset: a
seeded permutation of the process's rows per epoch (the remainder that does not fill a batch is
dropped), batched by Grain. Its position is Grain's iterator state plus a few checked fields, a
small JSON-able dict saved in every checkpoint, so a resumed run sees exactly the batches it
would have seen. The position counts batches, the same on every process, so the state that
process 0 saves restores all of them.

With one process the rows, their order and the batches are those of the pipeline before Grain
(the per-epoch permutation is numpy's `default_rng([seed, epoch])`); with several, each process
packs and permutes its own rows, and yields its batch_size / process_count share of each batch.
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Iterable, Optional, Sequence

import grain
import numpy as np

from ultrametric_jax.errors import ConfigError
from ultrametric_jax.run.data_corpus import (  # noqa: F401 (the corpus API, re-exported)
    TEXT_SUFFIXES, Document, check_decoded, load_corpus, shakespeare_dir, split_documents)

# Texts per call of the tokenizer: `encode_batch` tokenises a call's texts in parallel.
ENCODE_BATCH = 64
# Batches are gathers from host memory: no reader threads, no prefetch buffer.
READ_OPTIONS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


# ----------------------------------------------------------------------------- tokenizer

class CorpusTokenizer:
    """A `tokenizers.Tokenizer` plus the BOS / EOS / padding ids that packing needs.

    Text is encoded without added special tokens, and special-token strings that happen to
    occur in the corpus are encoded as plain text (packing alone places BOS and EOS).
    """

    def __init__(self, tokenizer, *, bos_id: int, eos_id: Optional[int], pad_id: int):
        self.tokenizer, self.bos_id, self.eos_id, self.pad_id = tokenizer, bos_id, eos_id, pad_id
        if hasattr(tokenizer, "encode_special_tokens"):
            tokenizer.encode_special_tokens = True

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(list(texts),
                                                           add_special_tokens=False)]


def _first(token_id):
    if isinstance(token_id, (list, tuple)):
        return token_id[0] if token_id else None
    return token_id


def corpus_tokenizer(model_path: str, llama_config) -> CorpusTokenizer:
    """The checkpoint's own tokenizer (tokenizer.json, or the GGUF's), with its special ids."""
    from ultrametric_jax.io.tokenizer import load_tokenizer  # io sits beside run, not below
    tok = load_tokenizer(model_path)
    if tok is None:
        raise ConfigError(f"no tokenizer found for model.path={model_path!r} (expected a "
                          "tokenizer.json next to the weights, or a .gguf with a vocabulary)")
    bos, eos = _first(llama_config.bos_token_id), _first(llama_config.eos_token_id)
    if bos is None:
        raise ConfigError(f"the model at {model_path!r} defines no bos_token_id; packed "
                          "sequences must start with BOS")
    pad = _first(llama_config.pad_token_id)
    pad = pad if pad is not None else (eos if eos is not None else 0)
    return CorpusTokenizer(tok, bos_id=int(bos), eos_id=None if eos is None else int(eos),
                           pad_id=int(pad))


class TokenizeTexts(grain.transforms.Map):
    """Grain map: a list of texts -> their token id lists."""

    def __init__(self, tokenizer: CorpusTokenizer):
        self.tokenizer = tokenizer

    def map(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer.encode_batch(texts)


def tokenize_documents(docs: Sequence[Document], tokenizer: CorpusTokenizer
                       ) -> list[list[int]]:
    """The token ids of each document, in order, through a Grain map over batches of texts."""
    dataset = (grain.MapDataset.source([d.text for d in docs])
               .batch(ENCODE_BATCH, batch_fn=list)
               .map(TokenizeTexts(tokenizer)))
    return [ids for i in range(len(dataset)) for ids in dataset[i]]


# ----------------------------------------------------------------------------- sharding

def process_shard(shard: Optional[grain.sharding.ShardOptions] = None
                  ) -> grain.sharding.ShardOptions:
    """`shard`, or this JAX process's (jax.process_index() of jax.process_count())."""
    return shard if shard is not None else grain.sharding.ShardByJaxProcess()


def shard_documents(docs: Sequence[Document],
                    shard: Optional[grain.sharding.ShardOptions] = None) -> list[Document]:
    """This process's documents: every shard_count-th from shard_index on. Interleaving keeps
    neighbours in id order (often of similar size) on different processes."""
    shard = process_shard(shard)
    own = grain.MapDataset.source(list(docs))[shard.shard_index::shard.shard_count]
    return [own[i] for i in range(len(own))]


# ----------------------------------------------------------------------------- packing

@dataclasses.dataclass(frozen=True)
class PackedSequences:
    """tokens int32 [N, S] (each row starts with BOS); mask bool [N, S] (False = padding).

    Also a Grain random-access source: item i is row i as {"input_ids", "attention_mask"}.
    """
    tokens: np.ndarray
    mask: np.ndarray

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def __getitem__(self, row: int) -> dict:
        return {"input_ids": self.tokens[row], "attention_mask": self.mask[row]}

    @property
    def num_tokens(self) -> int:
        return int(self.mask.sum())


def pack_token_lists(token_lists: Iterable[Sequence[int]], seq_len: int, *, bos_id: int,
                     eos_id: Optional[int], pad_id: int) -> PackedSequences:
    """Join documents (each followed by EOS), then cut rows of BOS + (seq_len - 1) tokens."""
    if seq_len < 2:
        raise ConfigError(f"invalid train.seq_len={seq_len}: must be >= 2")
    eos = [] if eos_id is None else [int(eos_id)]
    stream = np.fromiter((t for toks in token_lists for t in (*toks, *eos)), dtype=np.int64)
    body = seq_len - 1
    n = -(-len(stream) // body) if len(stream) else 0
    tokens = np.full((n, seq_len), pad_id, dtype=np.int32)
    mask = np.zeros((n, seq_len), dtype=bool)
    padded = np.full(n * body, pad_id, dtype=np.int64)
    padded[:len(stream)] = stream
    tokens[:, 0] = bos_id
    tokens[:, 1:] = padded.reshape(n, body)
    mask[:, 0] = True
    mask[:, 1:] = (np.arange(n * body) < len(stream)).reshape(n, body)
    return PackedSequences(tokens, mask)


def pack_documents(docs: Sequence[Document], tokenizer, seq_len: int) -> PackedSequences:
    """Tokenise (no special tokens added by the tokenizer) and pack."""
    return pack_token_lists(tokenize_documents(docs, tokenizer), seq_len,
                            bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id,
                            pad_id=tokenizer.pad_id)


# ----------------------------------------------------------------------------- iterators

class EpochOrder(grain.MapDataset):
    """Endless rows of `parent`: epoch e is the first `per_epoch` entries of numpy's
    `default_rng([seed, e])` permutation (the order of the pipeline before Grain)."""

    def __init__(self, parent: grain.MapDataset, *, seed: int, per_epoch: int):
        super().__init__(parent)
        self.seed, self.per_epoch = int(seed), int(per_epoch)
        self._cached = (-1, np.zeros(0, np.int64))  # (epoch, its permutation)

    def __len__(self) -> int:
        return sys.maxsize  # endless, like Grain's repeat()

    def _order(self, epoch: int) -> np.ndarray:
        cached = self._cached
        if cached[0] != epoch:
            cached = (epoch, np.random.default_rng([self.seed, epoch]).permutation(
                len(self._parent)))
            self._cached = cached
        return cached[1]

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, position = divmod(int(index), self.per_epoch)
        return self._parent[int(self._order(epoch)[position])]

    def __str__(self) -> str:
        return f"EpochOrder(seed={self.seed}, per_epoch={self.per_epoch})"


class BatchIterator:
    """Endless batches of this process's rows; resumable from `state()`.

    Each process yields batch_size / process_count rows per batch (all of batch_size with one).
    """

    def __init__(self, data: PackedSequences, batch_size: int, *, seed: int,
                 state: Optional[dict] = None,
                 shard: Optional[grain.sharding.ShardOptions] = None):
        shard = process_shard(shard)
        if batch_size < 1:
            raise ConfigError(f"invalid train.batch_size={batch_size}: must be >= 1")
        if batch_size % shard.shard_count:
            raise ConfigError(f"invalid train.batch_size={batch_size}: must be a multiple of "
                              f"the {shard.shard_count} processes, which each read their "
                              "share of every batch")
        local = batch_size // shard.shard_count
        if len(data) < local:
            where = ("" if shard.shard_count == 1 else
                     f" on process {shard.shard_index} of {shard.shard_count}")
            share = "" if shard.shard_count == 1 else f" (its share: {local})"
            raise ConfigError(
                f"the training split packs into {len(data)} sequence(s){where}, fewer than "
                f"train.batch_size={batch_size}{share}; use a larger corpus or smaller "
                "train.seq_len / train.batch_size")
        self.data, self.batch_size, self.seed = data, batch_size, int(seed)
        self.process_count, self.local_batch_size = shard.shard_count, local
        self.batches_per_epoch = len(data) // local  # the remainder of each epoch is dropped
        rows = EpochOrder(grain.MapDataset.source(data), seed=self.seed,
                          per_epoch=self.batches_per_epoch * local)
        batches = rows.batch(local, drop_remainder=True)  # every epoch holds whole batches
        self._iterator = iter(batches.to_iter_dataset(READ_OPTIONS))
        if state is not None:
            self.set_state(state)

    def state(self) -> dict:
        """JSON-able: Grain's state, the epoch / row position (this process's view) and the
        settings a restore checks."""
        grain_state = self._iterator.get_state()
        epoch, batch = divmod(int(grain_state["next_index"]), self.batches_per_epoch)
        return {"epoch": epoch, "position": batch * self.local_batch_size, "seed": self.seed,
                "num_sequences": len(self.data), "batch_size": self.batch_size,
                "process_count": self.process_count, "grain": grain_state}

    def set_state(self, state: dict) -> None:
        """Resume at `state` (this iterator's, any process's of the same run, or the pre-Grain
        {epoch, position, ...} form, which means the same batch)."""
        expected = {"seed": self.seed, "batch_size": self.batch_size,
                    "process_count": self.process_count}
        if self.process_count == 1:  # with several, the saved count is process 0's
            expected["num_sequences"] = len(self.data)
        saved = {**state, "process_count": state.get("process_count", 1)}
        for key, value in expected.items():
            if int(saved.get(key, value)) != value:
                raise ConfigError(
                    f"the saved data-iterator state has {key}={saved.get(key)} but this run "
                    f"has {key}={value}: the corpus or data settings changed since the "
                    "checkpoint was written (use a fresh --workdir)")
        if "grain" in state:
            self._iterator.set_state(dict(state["grain"]))
        else:
            batch = int(state["epoch"]) * self.batches_per_epoch + \
                int(state["position"]) // self.local_batch_size
            self._iterator.set_state({"next_index": batch})

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return next(self._iterator)


def eval_batches(data: PackedSequences, batch_size: int, num_batches: int) -> list[dict]:
    """The first num_batches * batch_size held-out rows, in order (fewer if the split is small)."""
    if batch_size < 1 or num_batches < 1:
        raise ConfigError(f"invalid eval.batch_size={batch_size} / eval.batches={num_batches}: "
                          "both must be >= 1")
    n = min(len(data), batch_size * num_batches)
    out = []
    for start in range(0, n - batch_size + 1, batch_size):
        out.append({"input_ids": data.tokens[start:start + batch_size],
                    "attention_mask": data.mask[start:start + batch_size]})
    if not out:
        raise ConfigError(f"the validation split packs into {len(data)} sequence(s), fewer "
                          f"than eval.batch_size={batch_size}")
    return out


def build_splits(data_config, tokenizer: CorpusTokenizer, seq_len: int, *,
                 shard: Optional[grain.sharding.ShardOptions] = None
                 ) -> tuple[PackedSequences, PackedSequences]:
    """(this process's training rows, the whole validation split) of the configured corpus."""
    docs = load_corpus(data_config.corpus, max_chars=data_config.max_chars,
                       chunk_chars=data_config.chunk_chars)
    train_docs, val_docs = split_documents(docs, data_config.val_fraction)
    return (pack_documents(shard_documents(train_docs, shard), tokenizer, seq_len),
            pack_documents(val_docs, tokenizer, seq_len))
