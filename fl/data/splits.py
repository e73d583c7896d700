"""Each domain's leakage-free train/test split, subsampled to the run's sizes, deterministically by seed."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from fl.data.sources import LabeledTexts, load_source
from fl.data.user_files import DataError

logger = logging.getLogger(__name__)

DOMAIN_TEST_FRACTION = 0.2


@dataclass(frozen=True)
class DomainData:
    """One domain's train and test sets, sharing one label space."""

    name: str
    train: LabeledTexts
    test: LabeledTexts

    @property
    def num_labels(self) -> int:
        return len(self.train.label_names)


def stratified_split(data: LabeledTexts, test_fraction: float, seed: int) -> tuple[LabeledTexts, LabeledTexts]:
    """Split into (train, test) with about ``test_fraction`` of each class in test, deterministically by seed.

    With ``data.groups`` set, whole groups go to one side: each group counts for its majority label
    (ties: smallest label id), and groups are added to test in seeded random order while that brings the
    class's test count closer to its target. Without groups every example is its own group. A class too
    small to split (target under one example, or a single group larger than twice its target) stays in
    train.
    """
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test fraction {test_fraction!r} is not in (0, 1)")
    rng = np.random.default_rng(seed)
    if data.groups is None:
        group_ids = np.arange(len(data))
    else:
        _, group_ids = np.unique(np.asarray(data.groups, dtype=object).astype(str), return_inverse=True)
    num_groups = int(group_ids.max()) + 1 if len(data) else 0
    group_sizes = np.bincount(group_ids, minlength=num_groups)
    label_counts = np.zeros((num_groups, len(data.label_names)), dtype=np.int64)
    np.add.at(label_counts, (group_ids, data.labels), 1)
    group_label = label_counts.argmax(axis=1)
    in_test = np.zeros(num_groups, dtype=bool)
    for label in range(len(data.label_names)):
        members = np.flatnonzero(group_label == label)
        target = min(round(test_fraction * group_sizes[members].sum()), group_sizes[members].sum() - 1)
        taken = 0
        for group in rng.permutation(members):
            if abs(taken + group_sizes[group] - target) < abs(taken - target):
                in_test[group] = True
                taken += group_sizes[group]
    test_mask = in_test[group_ids]
    return data.subset(np.flatnonzero(~test_mask)), data.subset(np.flatnonzero(test_mask))


def sample_per_domain(data: LabeledTexts, n: int | None, seed: int) -> LabeledTexts:
    """A stratified random subsample of at most ``n`` examples (``None``: all), deterministic by seed.

    Each class gets its proportional share of ``n``, rounded by largest remainder; the result keeps the
    original example order.
    """
    if n is not None and n < 1:
        raise DataError(f"sample size {n!r} is not a positive integer or None")
    if n is None or n >= len(data):
        return data
    rng = np.random.default_rng(seed)
    counts = np.bincount(data.labels, minlength=len(data.label_names))
    quotas = counts * n / len(data)
    take = np.floor(quotas).astype(np.int64)
    by_remainder = np.argsort(-(quotas - take), kind="stable")
    take[by_remainder[: n - int(take.sum())]] += 1
    chosen = [
        rng.choice(np.flatnonzero(data.labels == label), size=k, replace=False) for label, k in enumerate(take) if k
    ]
    return data.subset(np.sort(np.concatenate(chosen)))


def load_domain(
    name: str,
    source: str,
    *,
    train_size: int | None,
    test_size: int | None,
    seed: int,
    text_column: str = "text",
    label_column: str = "label",
    group_column: str = "",
) -> DomainData:
    """Load ``source``, split it (test fraction 0.2, by group where groups exist) and subsample each side."""
    data = load_source(source, text_column=text_column, label_column=label_column, group_column=group_column)
    train, test = stratified_split(data, DOMAIN_TEST_FRACTION, seed)
    if not len(test):
        raise DataError(
            f"data source {source!r} leaves no test examples: each label has too few examples (or groups) for a "
            f"{DOMAIN_TEST_FRACTION:.0%} test share; expected a label with at least 3 examples"
        )
    domain = DomainData(
        name=name, train=sample_per_domain(train, train_size, seed), test=sample_per_domain(test, test_size, seed)
    )
    logger.info(
        "domain %s: %d train, %d test, %d classes", name, len(domain.train), len(domain.test), domain.num_labels
    )
    return domain
