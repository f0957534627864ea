"""Domain separation (experiments/domain_separation.py): do the hard routes tell Shakespeare,
Python code and Python's documentation apart? Per-document route fingerprints for the trained
router, a freshly collapse-initialised one and a random one of the trained one's scale.

  python experiments/domain_separation.py --run-dir RUN [--config.docs_per_domain=60 ...]
  python experiments/domain_separation.py --toy            # CPU: a tiny random run built here

get_config("toy") is the small CPU variant the tests run.
"""
import ml_collections


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.name = "domain_separation"
    config.seed = 0

    # Documents: docs_per_domain pieces of each domain, each cut to doc_tokens tokens (BOS
    # first, not counted in the fingerprint). Pieces come from load_corpus with chunk_chars
    # (the run's own chunk_chars for the corpus it trained on, whose held-out split is used).
    config.docs_per_domain = 40
    config.doc_tokens = 512
    config.chunk_chars = 4000
    config.val_fraction = 0.1            # held-out share for a corpus the run did not train on
    # The third domain: "auto" (reST/text of a Python documentation package under
    # /usr/share/doc/python3*-doc/ when present, else the Python reference topics that
    # pydoc_data ships), or a corpus spec for load_corpus (a file or a directory).
    config.third = "auto"
    config.batch = 8

    config.knn_k = 5
    config.routers = ("trained", "collapse", "random")

    if variant == "toy":
        config.docs_per_domain = 6
        config.doc_tokens = 48
        config.chunk_chars = 600
        config.batch = 6
    elif variant:
        raise ValueError(f"unknown variant {variant!r} (known: 'toy')")
    return config
