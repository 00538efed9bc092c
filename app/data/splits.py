"""From what a source holds to `Splits`: check labels, hold out validation, apply the limits
(all seeded and stratified), then decode what fits in memory.

Streamed splits (TFRecord files) have no labels in memory: their hold-out is by position
(the last `validation_split` of every file's records, as TFDS's `train[90%:]`), their
limits take the first records of every file in proportion, and a split whose files fit
the memory budget is read into memory here and treated as encoded images.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from app.data import stream
from app.data.decode import decode_if_fits, memory_budget
from app.data.types import DataConfig, DataError, Examples, RawSplits, RecordFile, Splits


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


def _part(f: RecordFile, skip: int, take: int) -> RecordFile:
    return RecordFile(f.path, skip, take, f.num_bytes * take // max(1, f.take))


def _holdout_records(examples: Examples, fraction: float) -> tuple[Examples, Examples]:
    """(train, validation): the last `fraction` of every file's records is validation."""
    train, validation = [], []
    for f in examples.records.files:
        held = round(fraction * f.take)
        train.append(_part(f, f.skip, f.take - held))
        validation.append(_part(f, f.skip + f.take - held, held))
    return tuple(
        dataclasses.replace(examples, records=examples.records.with_files(parts))
        for parts in (train, validation)
    )


def _limit_records(examples: Examples, limit: int) -> Examples:
    """The first records of every file, `limit` in all, in proportion to the files' sizes
    (largest remainders first)."""
    files, n = examples.records.files, examples.num_examples
    shares = [limit * f.take / n for f in files]
    takes = [math.floor(s) for s in shares]
    by_remainder = sorted(range(len(files)), key=lambda i: (takes[i] - shares[i], i))
    for i in by_remainder[: limit - sum(takes)]:
        takes[i] += 1
    parts = [_part(f, f.skip, t) for f, t in zip(files, takes, strict=True)]
    return dataclasses.replace(examples, records=examples.records.with_files(parts))


def _holdout(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split of indices into (train, validation); a pure function of seed."""
    n = len(labels)
    val = _stratified_pick(labels, max(1, round(fraction * n)), np.random.default_rng([seed, 0]))
    return np.setdiff1d(np.arange(n), val), val


def _limit(examples: Examples, limit: int | None, seed: int, salt: int) -> Examples:
    """At most `limit` examples: a seeded, stratified subset, kept in stored order."""
    if limit is None or limit >= examples.num_examples:
        return examples
    if examples.streamed:
        return _limit_records(examples, limit)
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


def read_if_fits(examples: Examples, budget: int) -> Examples:
    """Streamed `examples` whose files take at most `budget` bytes, read into memory as
    encoded images (decoded next, if they share a size and fit); others unchanged."""
    if not examples.streamed or examples.records.num_bytes > budget:
        return examples
    parts = list(stream.encoded_batches(examples.records, 4096))
    empty = np.zeros(0, object), np.zeros(0, np.int64)
    encoded, labels = (np.concatenate(x) for x in zip(*parts, strict=True)) if parts else empty
    return Examples(labels, encoded=encoded, origin=examples.origin, max_pixels=examples.max_pixels)


def hold_out(raw: RawSplits, config: DataConfig) -> tuple[RawSplits, bool]:
    """`raw` with validation held out of train when it has none (or as evaluation data),
    and whether it was; no limits, nothing decoded (`app.make_shards` writes this).

    Raises:
        DataError: an empty split, a label out of range, or a hold-out that leaves a split empty.
    """
    num_classes = len(raw.class_names)
    for ex in (raw.train, raw.validation, raw.test):
        if ex is None:
            continue
        if ex.num_examples == 0:
            raise DataError(f"{ex.origin} holds no examples")
        if ex.streamed:
            continue  # labels are checked as the records are read
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
        if train.streamed:
            train, validation = _holdout_records(train, config.validation_split)
        else:
            t, v = _holdout(train.labels, config.validation_split, config.seed)
            train, validation = train.subset(t), train.subset(v)
        if validation.num_examples == 0 or train.num_examples == 0:
            raise DataError(
                f"--validation_split={config.validation_split} leaves "
                f"{train.num_examples} train / {validation.num_examples} validation examples "
                f"of {raw.train.num_examples}; choose a fraction that leaves both non-empty"
            )
    return dataclasses.replace(raw, train=train, validation=validation), held_out


def finish(raw: RawSplits, config: DataConfig) -> Splits:
    """`raw` checked, with validation held out (when it has none), limited, and decoded or
    read into memory as far as it fits (`config.memory_budget_mb`).

    Evaluation data (`_evaluation_only`) gets empty train and, when it has none of its
    own, empty validation splits; training on it fails for want of examples.

    Raises:
        DataError: an empty split, a label out of range, or a hold-out that leaves a split empty.
    """
    raw, held_out = hold_out(raw, config)
    raw = limit(raw, config)
    budget = memory_budget(config.memory_budget_mb)

    def in_memory(ex: Examples) -> Examples:
        ex = dataclasses.replace(ex, max_pixels=config.max_pixels)
        if ex.streamed:
            window = stream.window_bytes(budget)
            ex = dataclasses.replace(
                ex, records=dataclasses.replace(ex.records, window_bytes=window)
            )
        read = read_if_fits(ex, budget)
        return decode_if_fits(read, None if read is not ex else raw.fixed_shape, budget)

    train, validation, test = (
        None if ex is None else in_memory(ex) for ex in (raw.train, raw.validation, raw.test)
    )
    return Splits(train, validation, test, raw.class_names, raw.source, held_out)


def limit(raw: RawSplits, config: DataConfig) -> RawSplits:
    """`raw` (after `hold_out`) within --train_limit and --eval_limit."""
    # Salts 1-3: the limits of train, validation and test are independent draws.
    return dataclasses.replace(
        raw,
        train=_limit(raw.train, config.train_limit, config.seed, 1),
        validation=_limit(raw.validation, config.eval_limit, config.seed, 2),
        test=None if raw.test is None else _limit(raw.test, config.eval_limit, config.seed, 3),
    )
