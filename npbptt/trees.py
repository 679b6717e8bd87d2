"""Helpers on the small trees npbptt passes around: a state or cotangent is a tuple of (L, B, H)
arrays, a step's cache a nested tuple/list of arrays whose leading axis is the batch row (or,
stacked over steps, time-major rows t*B + b).  Written once for ``probe`` and ``theory``."""
import numpy as np

__all__ = ["stack", "rows", "leading", "row_norms"]


def stack(trees):
    """Concatenate along axis 0 the matching arrays of a list of caches (tuples/lists of arrays)."""
    first = trees[0]
    if isinstance(first, np.ndarray):
        return np.concatenate(trees, axis=0)
    return type(first)(stack([t[i] for t in trees]) for i in range(len(first)))


def rows(tree, lo, hi):
    """Rows lo:hi of every array of a (stacked) cache."""
    if isinstance(tree, np.ndarray):
        return tree[lo:hi]
    return type(tree)(rows(t, lo, hi) for t in tree)


def leading(tree):
    """The leading-axis length of every array of a cache (None for a 0-d array)."""
    if isinstance(tree, np.ndarray):
        yield tree.shape[0] if tree.ndim else None
    else:
        for t in tree:
            yield from leading(t)


def row_norms(b):
    """||b^{(r)}|| over the concatenated state of every row r: a tuple of (L, R, H) -> (R,); with
    b_k = dL_T/dS_{T-k} this is phi_k of Eq. (18) per example."""
    return np.sqrt(sum((a * a).sum(axis=(0, 2)) for a in b))
