"""The shuffled-text control: every sentence moved to a sample of another image.

A model that reads the expression must lose accuracy when each sample gets the sentence of an unrelated
image; a model that ignores the text scores the same. The permutation is a derangement at the image level
(no sentence stays with its own image), uses every sentence exactly once, and depends only on the seed and
the samples' image keys:

    1. images in a seeded random order, the samples of one image next to each other;
    2. the sample at position k takes the sentence of the sample at position (k + m) mod N, where m is
       the largest number of samples of one image. Two positions m apart (or N - m apart, which is at
       least m when N >= 2m) can never fall in the same image's run, so no sentence stays home.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np

TEXT_MODES = ("matched", "shuffled")


def shuffled_sources(image_keys: Sequence[Hashable], seed: int = 0) -> list[int]:
    """For samples with these image keys, `src` with sample i taking the sentence of sample src[i]:
    a permutation with image_keys[src[i]] != image_keys[i] for every i.

    Raises ValueError when no such permutation exists (one image holds more than half the samples)."""
    n = len(image_keys)
    if n == 0:
        return []
    groups: dict[Hashable, list[int]] = {}
    for i, key in enumerate(image_keys):
        groups.setdefault(key, []).append(i)
    largest = max(len(g) for g in groups.values())
    if 2 * largest > n:
        raise ValueError(f"cannot give every sample a sentence of another image: one image holds {largest} of "
                         f"{n} samples (more than half)")
    keys = list(groups)
    order = np.random.default_rng(int(seed)).permutation(len(keys))
    positions = [i for k in order for i in groups[keys[k]]]
    src = [0] * n
    for k, i in enumerate(positions):
        src[i] = positions[(k + largest) % n]
    return src
