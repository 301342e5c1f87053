"""Spotting a repetition loop: the tail of a generation made of the same n-gram over and over.

A base (pretrained) model decoding greedily, or any small model, can fall into printing one line until the
token limit. Stopping it there is kinder to the reader than hundreds of copies, and costs nothing when the
text is not looping. Used by the server (per request, on token ids) and by ``gemmax chat``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

MIN_REPEATS = 4
"""Copies of the n-gram (the first one included) that make a loop."""
MIN_SPAN = 32
"""Tokens the copies must cover together: short phrases legitimately repeat a few times ("ha ha ha")."""
MAX_PERIOD = 128
"""The longest n-gram looked for, in tokens: a repeated sentence or line fits."""


def loop_period(ids: Sequence[int], min_repeats: int = MIN_REPEATS, min_span: int = MIN_SPAN,
                max_period: int = MAX_PERIOD) -> int:
    """The length ``p`` of the shortest n-gram that the end of ``ids`` repeats ``min_repeats`` times in a row
    (and over at least ``min_span`` tokens), or 0 when it does not loop.

    The tail is periodic with period ``p`` when ``ids[-L:] == ids[-L - p:-p]`` for ``L = span - p``; one
    vectorised comparison per candidate period keeps a check well under a millisecond."""
    a = np.asarray(ids, dtype=np.int64)
    n = len(a)
    for p in range(1, min(max_period, n // min_repeats) + 1):
        span = max(p * min_repeats, min_span)
        if span > n:
            break
        tail = a[n - span:]
        if np.array_equal(tail[p:], tail[:-p]):
            return p
    return 0
