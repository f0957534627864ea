"""A float64 numpy reference of the key selector's score estimate (surgery/key_selector.py)."""
import numpy as np


def np_bilinear(query_gram, key_cov, rank, ridge=1e-6):
    """float64 A = Cq^-1/2 [Cq^1/2 Ck^1/2]_rank Ck^-1/2 (both diagonals + ridge * trace / D)."""
    dim = query_gram.shape[0]

    def roots(c):
        w, v = np.linalg.eigh(c + ridge * np.trace(c) / dim * np.eye(dim))
        return (v * np.sqrt(w)) @ v.T, (v / np.sqrt(w)) @ v.T

    (qr, qi), (kr, ki) = roots(query_gram), roots(key_cov)
    u, sv, vt = np.linalg.svd(qr @ kr)
    return qi @ (u[:, :rank] * sv[:rank]) @ vt[:rank] @ ki
