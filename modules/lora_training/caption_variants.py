"""Training-time caption variants: tag shuffling with kept tokens, and tag dropout.

A caption is read as comma-separated tags. Some tags are *pinned*: the first ``keep_tokens`` ones and
every tag holding the trigger word (prepare puts it first; a caption edited to carry it elsewhere keeps
it where it is). Pinned tags never move and are never dropped. Each other tag is dropped with
probability ``dropout``; with ``shuffle`` the surviving ones are permuted among their own places, so the
pinned tags keep their places among the tags that remain.

:func:`caption_variant` is a pure function of (caption, options, seed, step, index): its random draws
come from a ``random.Random`` seeded by a hash of (seed, step, index), where the trainer's index names
the sample's place in the step and its image. A run stopped and resumed therefore trains on the same
caption sequence as one that never stopped, and N processes train the same captions as one.

Text embeddings. A cached embedding is one per caption; variants change the caption at each step, so
the trainer chooses (:func:`variants_to_cache`):

- **cache every variant** when each caption has at most ``VARIANTS_PER_CAPTION`` (6) variants on
  average (e.g. at most 3 shuffled tags and no dropout) *and* the run would encode more captions than
  there are variants: encoding each variant once is then cheaper than encoding at each step, and the
  cache stays within a few times its usual size;
- otherwise **encode at each step**: the text encoders stay on the device (slower, more memory), and
  the run log says so.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import random
import re

from modules.lora_training.dataset.captions import join_tags, split_tags

VARIANTS_PER_CAPTION = 6


def variants_on(*, shuffle: bool, dropout: float) -> bool:
    return shuffle or dropout > 0


def _pinned(tags: list[str], *, trigger: str, keep_tokens: int) -> list[bool]:
    trigger = trigger.strip()
    pattern = re.compile(rf"(?<![\w-]){re.escape(trigger)}(?![\w-])", re.IGNORECASE) if trigger else None
    return [index < keep_tokens or bool(pattern and pattern.search(tag)) for index, tag in enumerate(tags)]


def _join(tags: list[str], pinned: list[bool], placed: dict[int, str]) -> str:
    """The pinned tags in their places and the free places that hold a tag (``placed``), in order."""
    return join_tags(
        [
            tag if keep else placed[i]
            for i, (tag, keep) in enumerate(zip(tags, pinned, strict=True))
            if keep or i in placed
        ]
    )


def _rng(seed: int, step: int, index: int | str) -> random.Random:
    digest = hashlib.sha256(f"caption/{seed}/{step}/{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def caption_variant(
    caption: str,
    *,
    trigger: str,
    keep_tokens: int,
    shuffle: bool,
    dropout: float,
    seed: int,
    step: int,
    index: int | str,
) -> str:
    """The caption trained at ``step`` for sample ``index``: the same arguments always give the same text.
    With shuffle and dropout off the caption is returned as it is."""
    if not variants_on(shuffle=shuffle, dropout=dropout):
        return caption
    tags = split_tags(caption)
    pinned = _pinned(tags, trigger=trigger, keep_tokens=keep_tokens)
    rng = _rng(seed, step, index)
    free = [i for i, keep in enumerate(pinned) if not keep]
    if dropout > 0:
        free = [i for i in free if rng.random() >= dropout]
    order = [tags[i] for i in free]
    if shuffle:
        rng.shuffle(order)
    return _join(tags, pinned, dict(zip(free, order, strict=True)))


def all_variants(caption: str, *, trigger: str, keep_tokens: int, shuffle: bool, dropout: float) -> set[str]:
    """Every text :func:`caption_variant` can return for ``caption`` (for captions with few free tags)."""
    if not variants_on(shuffle=shuffle, dropout=dropout):
        return {caption}
    tags = split_tags(caption)
    pinned = _pinned(tags, trigger=trigger, keep_tokens=keep_tokens)
    free = [i for i, keep in enumerate(pinned) if not keep]
    sizes = range(len(free) + 1) if dropout > 0 else (len(free),)
    found = set()
    for size in sizes:
        for kept in itertools.combinations(free, size):
            orders = itertools.permutations(kept) if shuffle else (kept,)
            found.update(
                _join(tags, pinned, {i: tags[j] for i, j in zip(kept, order, strict=True)}) for order in orders
            )
    return found


def variant_count(
    caption: str, *, trigger: str, keep_tokens: int, shuffle: bool, dropout: float, ceiling: int | None = None
) -> int:
    """How many variants a caption has at most (without listing them). With ``ceiling``, counting stops
    once past it (the answer is then ``ceiling + 1``): a caption of thousands of tags has a count of
    thousands of digits, which takes minutes to compute exactly."""
    if not variants_on(shuffle=shuffle, dropout=dropout):
        return 1
    tags = split_tags(caption)
    free = sum(not keep for keep in _pinned(tags, trigger=trigger, keep_tokens=keep_tokens))
    past = math.inf if ceiling is None else ceiling
    if not shuffle:
        return ceiling + 1 if ceiling is not None and free >= ceiling.bit_length() else 2**free
    # orders of ``size`` tags among ``free``: free * (free - 1) * ... (size factors); with dropout every size
    # counts, without it only size == free
    total = orders = 1
    for size in range(1, free + 1):
        orders *= free - size + 1
        total = total + orders if dropout > 0 else orders
        if total > past:
            return ceiling + 1
    return total


def variants_to_cache(
    captions: list[str], *, trigger: str, keep_tokens: int, shuffle: bool, dropout: float, encodings: int
) -> list[str] | None:
    """All variants of ``captions`` when caching them is cheaper than encoding at each step (the rule in
    the module's docstring); None when the run should encode at each step."""
    distinct = sorted(set(captions))
    options = {"trigger": trigger, "keep_tokens": keep_tokens, "shuffle": shuffle, "dropout": dropout}
    total, most = 0, min(encodings, VARIANTS_PER_CAPTION * len(distinct))
    for caption in distinct:
        total += variant_count(caption, **options, ceiling=most)
        if total > most:
            return None
    return sorted(set().union(*(all_variants(caption, **options) for caption in distinct)))


def describe_options(*, shuffle: bool, keep_tokens: int, dropout: float) -> list[str]:
    """The run log's words for the options that are on."""
    words = []
    if shuffle:
        kept = f"the first {keep_tokens} and the trigger" if keep_tokens else "the trigger"
        words.append(f"caption tags shuffled ({kept} kept in place)")
    if dropout > 0:
        words.append(f"tag dropout {dropout:g}")
    return words
