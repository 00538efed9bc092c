"""From what a source holds to `Splits`: check labels, hold out validation, apply the limits
(all seeded and stratified), then decode what fits in memory."""

from __future__ import annotations

import dataclasses

import numpy as np

from app.data.decode import decode_if_fits
from app.data.types import DataConfig, DataError, Examples, RawSplits, Splits


def _stratified_pick(labels: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of `k` examples, each class represented in proportion to its size.

    Shuffles each class, keys its members by their quantile within the class, and takes
    the `k` lowest keys overall (random tie-break), so small classes are not left out.
    """
    quantile = np.empty(len(labels))
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        quantile[idx] = (np.arange(len(idx)) + 0.5) / len(idx)
    return np.sort(np.lexsort((rng.random(len(labels)), quantile))[:k])


def _holdout(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split of indices into (train, validation); a pure function of seed."""
    n = len(labels)
    val = _stratified_pick(labels, max(1, round(fraction * n)), np.random.default_rng([seed, 0]))
    return np.setdiff1d(np.arange(n), val), val


def _limit(examples: Examples, limit: int | None, seed: int, salt: int) -> Examples:
    """At most `limit` examples: a seeded, stratified subset, kept in stored order."""
    if limit is None or limit >= examples.num_examples:
        return examples
    return examples.subset(
        _stratified_pick(examples.labels, limit, np.random.default_rng([seed, salt]))
    )


def _evaluation_only(raw: RawSplits, config: DataConfig) -> RawSplits | None:
    """`raw` as evaluation data (empty train, all of it test), or None when it trains.

    That is data with no train split (an image folder with only test/), or data with
    neither validation nor test at --validation_split=0 (a folder of <class>/ folders meant
    for evaluation: nothing held out, all of it is evaluated).
    """
    if raw.train is None:
        test = raw.test if raw.test is not None else raw.validation
    elif raw.validation is None and raw.test is None and config.validation_split == 0:
        test = raw.train
    else:
        return None
    empty = test.subset(np.arange(0))
    validation = raw.validation if raw.validation is not None else empty
    return RawSplits(empty, validation, test, raw.class_names, raw.source, raw.fixed_shape)


def finish(raw: RawSplits, config: DataConfig) -> Splits:
    """`raw` checked, with validation held out (when it has none), limited and decoded.

    Evaluation data (`_evaluation_only`) gets empty train and, when it has none of its
    own, empty validation splits; training on it fails for want of examples.

    Raises:
        DataError: an empty split, a label out of range, or a hold-out that leaves a split empty.
    """
    num_classes = len(raw.class_names)
    for ex in (raw.train, raw.validation, raw.test):
        if ex is None:
            continue
        if ex.num_examples == 0:
            raise DataError(f"{ex.origin} holds no examples")
        bad = np.flatnonzero((ex.labels < 0) | (ex.labels >= num_classes))
        if bad.size:
            raise DataError(
                f"{ex.origin}: label {ex.labels[bad[0]]} is out of range [0, {num_classes})"
            )
    evaluation = _evaluation_only(raw, config)
    if evaluation is not None:
        raw = evaluation
    train, validation = raw.train, raw.validation
    held_out = validation is None
    if held_out:
        if not 0.0 < config.validation_split < 1.0:
            raise DataError(
                f"--validation_split={config.validation_split}: {train.origin} has no "
                "validation split, so a fraction in (0, 1) of train is held out; pass e.g. 0.1"
            )
        t, v = _holdout(train.labels, config.validation_split, config.seed)
        if len(v) == 0 or len(t) == 0:
            raise DataError(
                f"--validation_split={config.validation_split} leaves "
                f"{len(t)} train / {len(v)} validation examples of {train.num_examples}; "
                "choose a fraction that leaves both non-empty"
            )
        train, validation = train.subset(t), train.subset(v)
    # Salts 1-3: the limits of train, validation and test are independent draws.
    train = _limit(train, config.train_limit, config.seed, 1)
    validation = _limit(validation, config.eval_limit, config.seed, 2)
    test = _limit(raw.test, config.eval_limit, config.seed, 3) if raw.test is not None else None
    train, validation, test = (
        None
        if ex is None
        else decode_if_fits(dataclasses.replace(ex, max_pixels=config.max_pixels), raw.fixed_shape)
        for ex in (train, validation, test)
    )
    return Splits(train, validation, test, raw.class_names, raw.source, held_out)
