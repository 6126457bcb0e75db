"""Compilation options numba does not expose per function.

Numba runs LLVM's loop vectoriser but leaves the SLP (straight-line) vectoriser off
(``NUMBA_SLP_VECTORIZE=0``). Our kernels rely on it in one place the loop vectoriser cannot
help: sums kept in a fixed number of independent partials (eight float64 lanes per log-det),
which are an ordered reduction to the loop vectoriser but eight independent vertical adds
to SLP. With SLP, ``_sum8`` over a float32 row becomes one convert and one 512-bit add per
eight elements (measured 2.0x faster: 1.24 -> 0.62 ms for 2^22 elements, one thread). SLP
does not reassociate, so the results are bitwise those of the scalar code.

``slp(dispatcher)`` turns it on for that dispatcher's compilations only (numba reads the
setting when it builds a library's pass manager), leaving the user's own numba code as is.
"""

from __future__ import annotations

import threading

from numba.core import config

_LOCK = threading.Lock()


def slp(dispatcher):
    """Compile ``dispatcher``'s specialisations (and the parfor kernels inside them) with
    LLVM's SLP vectoriser on; returns the dispatcher."""
    compile_ = dispatcher.compile

    def compile(sig):
        with _LOCK:
            before = config.SLP_VECTORIZE
            config.SLP_VECTORIZE = 1
            try:
                return compile_(sig)
            finally:
                config.SLP_VECTORIZE = before

    dispatcher.compile = compile
    return dispatcher
