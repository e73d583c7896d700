"""Tests for fl.data: user files, splits, subsamples and client partitions (the embedded sources: test_embedded.py)."""
import json
from pathlib import Path

import numpy as np
import pytest

from fl.data import partitions, sources, splits
from fl.data.sources import LabeledTexts
from fl.data.user_files import DataError


def _toy(labels: list[int], groups: list[str] | None = None) -> LabeledTexts:
    return LabeledTexts(
        texts=tuple(f"text {i}" for i in range(len(labels))),
        labels=np.asarray(labels),
        label_names=tuple(f"c{k}" for k in range(max(labels) + 1)),
        groups=None if groups is None else tuple(groups),
    )


def _write_csv(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------- splits


def test_group_split_keeps_each_licence_on_one_side():
    licenses = sources.load_source("licenses")

    train, test = splits.stratified_split(licenses, 0.2, seed=0)

    assert not set(train.groups) & set(test.groups)
    assert len(train) + len(test) == len(licenses)
    assert 0.15 <= len(test) / len(licenses) <= 0.25


def test_stratified_split_is_deterministic_by_seed_and_seeds_differ():
    hpo = sources.load_source("hpo")

    train_a, test_a = splits.stratified_split(hpo, 0.2, seed=1)
    train_b, test_b = splits.stratified_split(hpo, 0.2, seed=1)
    _, test_c = splits.stratified_split(hpo, 0.2, seed=2)

    assert test_a.texts == test_b.texts and train_a.texts == train_b.texts
    assert test_a.texts != test_c.texts
    assert not set(train_a.texts) & set(test_a.texts)


def test_stratified_split_puts_every_class_with_10_examples_in_test():
    hpo = sources.load_source("hpo")
    counts = np.bincount(hpo.labels)

    train, test = splits.stratified_split(hpo, 0.2, seed=0)

    test_counts = np.bincount(test.labels, minlength=len(counts))
    assert all(test_counts[label] > 0 for label in np.flatnonzero(counts >= 10))
    assert np.all(np.abs(test_counts - 0.2 * counts) <= 1)
    assert train.label_names == hpo.label_names


def test_stratified_split_keeps_unsplittable_classes_in_train():
    toy = _toy([0] * 20 + [1] + [2] * 6, groups=[f"a{i}" for i in range(20)] + ["b"] + ["big"] * 6)

    train, test = splits.stratified_split(toy, 0.2, seed=0)

    assert 1 not in test.labels and 2 not in test.labels
    assert np.sum(test.labels == 0) == 4
    with pytest.raises(DataError, match="1.5"):
        splits.stratified_split(toy, 1.5, seed=0)


def test_group_column_keeps_each_document_on_one_side(tmp_path):
    rng = np.random.default_rng(0)
    rows = [f"doc {d} chunk {c},{'ab'[d % 2]},doc-{d}" for d in range(40) for c in range(int(rng.integers(1, 6)))]
    path = _write_csv(tmp_path / "chunks.csv", "text,label,doc", rows)

    domain = splits.load_domain("toy", str(path), train_size=None, test_size=None, seed=0, group_column="doc")

    assert set(domain.train.groups).isdisjoint(domain.test.groups)
    assert len(domain.train) + len(domain.test) == len(rows)
    assert set(domain.test.labels.tolist()) == {0, 1}
    ungrouped = splits.load_domain("toy", str(path), train_size=None, test_size=None, seed=0)
    documents = [{text.split(" chunk")[0] for text in side.texts} for side in (ungrouped.train, ungrouped.test)]
    assert ungrouped.train.groups is None and not documents[0].isdisjoint(documents[1])  # without it, documents cross


def test_rows_without_a_group_are_dropped_with_one_counted_warning(tmp_path, caplog):
    rows = [f"text {i},{'ab'[i % 2]},{'' if i < 3 else f'g{i}'}" for i in range(12)]
    path = _write_csv(tmp_path / "g.csv", "text,label,doc", rows)

    loaded = sources.load_source(str(path), group_column="doc")

    assert len(loaded) == 9 and loaded.groups == tuple(f"g{i}" for i in range(3, 12))
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"{path}: dropped 3 of 12 rows with an empty text, no label or no group"
    ]


def test_labels_with_a_single_example_are_dropped_with_one_counted_warning(tmp_path, caplog):
    rows = [f"text {i},{'ab'[i % 2]}" for i in range(10)] + ["lonely,z", "alone,y"]
    path = _write_csv(tmp_path / "rare.csv", "text,label", rows)

    loaded = sources.load_source(str(path))

    assert loaded.label_names == ("a", "b") and len(loaded) == 10
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"{path}: dropped 2 examples of 2 labels with fewer than 2 examples: y, z"
    ]


def test_sample_per_domain_is_stratified_and_deterministic():
    toy = _toy([0] * 600 + [1] * 300 + [2] * 100)

    sample = splits.sample_per_domain(toy, 100, seed=3)

    assert len(sample) == 100
    assert np.bincount(sample.labels).tolist() == [60, 30, 10]
    assert sample.texts == splits.sample_per_domain(toy, 100, seed=3).texts
    assert sample.texts != splits.sample_per_domain(toy, 100, seed=4).texts
    assert splits.sample_per_domain(toy, None, seed=3) is toy


def test_load_domain_splits_and_subsamples(tmp_path):
    rows = [f"sentence number {i},{'pos' if i % 2 else 'neg'}" for i in range(100)]
    path = _write_csv(tmp_path / "toy.csv", "text,label", rows)

    domain = splits.load_domain("toy", str(path), train_size=30, test_size=10, seed=0)

    assert (len(domain.train), len(domain.test), domain.num_labels) == (30, 10, 2)
    assert not set(domain.train.texts) & set(domain.test.texts)


# ------------------------------------------------------------------------------------------- user files


def test_csv_with_custom_columns_maps_string_labels(tmp_path):
    rows = ["a cat,zoo,1", "a law,court,2", "  ,zoo,3", "a dog,zoo,4", "a judge,court,5"]
    path = _write_csv(tmp_path / "reviews.csv", "sentence,topic,extra", rows)

    loaded = sources.load_source(str(path), text_column="sentence", label_column="topic")

    assert loaded.label_names == ("court", "zoo")
    assert loaded.texts == ("a cat", "a law", "a dog", "a judge")
    assert loaded.labels.tolist() == [1, 0, 1, 0]
    assert loaded.groups is None


def test_jsonl_with_integer_labels_keeps_numeric_order(tmp_path):
    path = tmp_path / "docs.jsonl"
    records = [{"body": f"doc {i}", "y": label} for i, label in enumerate([10, 2, 2, 10, 1, 1])]
    path.write_text("\n".join(json.dumps(record) for record in records) + "\n", encoding="utf-8")

    loaded = sources.load_source(str(path), text_column="body", label_column="y")

    assert loaded.label_names == ("1", "2", "10")
    assert loaded.labels.tolist() == [2, 1, 1, 2, 0, 0]


def test_json_file_holding_json_lines_or_a_list_of_records_loads_alike(tmp_path):
    records = [{"text": f"doc {i}", "label": "xy"[i % 2]} for i in range(4)]
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(r) for r in records), encoding="utf-8")
    (tmp_path / "list.json").write_text(json.dumps(records, indent=1), encoding="utf-8")

    lines = sources.load_source(str(tmp_path / "lines.json"))
    listed = sources.load_source(str(tmp_path / "list.json"))

    assert lines.texts == listed.texts == tuple(r["text"] for r in records)
    assert lines.labels.tolist() == listed.labels.tolist() == [0, 1, 0, 1]


def test_hf_source_reads_a_local_dataset_folder_and_split(tmp_path):
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    _write_csv(folder / "train.csv", "text,label", ["good film,pos", "bad film,neg", "fine film,pos", "poor film,neg"])
    _write_csv(folder / "test.csv", "text,label", ["great film,pos", "awful film,neg", "nice film,pos", "dull film,neg"])

    train = sources.load_source(f"hf:{folder}")
    test = sources.load_source(f"hf:{folder}@test")

    assert train.texts == ("good film", "bad film", "fine film", "poor film") and train.labels.tolist() == [1, 0, 1, 0]
    assert test.texts == ("great film", "awful film", "nice film", "dull film") and test.label_names == ("neg", "pos")
    with pytest.raises(DataError, match=r"could not be loaded as a dataset: Unknown split"):
        sources.load_source(f"hf:{folder}@validation")


def test_hf_source_uses_class_label_names(tmp_path):
    import datasets

    folder = tmp_path / "classlabel"
    folder.mkdir()
    label = datasets.ClassLabel(names=["zeta", "alpha", "mid"])
    features = datasets.Features({"text": datasets.Value("string"), "label": label})
    table = datasets.Dataset.from_dict({"text": ["x", "y", "z", "w"], "label": [0, 1, 1, 0]}, features=features)
    table.to_parquet(str(folder / "train.parquet"))

    loaded = sources.load_source(f"hf:{folder}")

    assert loaded.label_names == ("zeta", "alpha", "mid")
    assert loaded.labels.tolist() == [0, 1, 1, 0]


def test_missing_file_is_named():
    with pytest.raises(DataError, match=r"data file 'nowhere/x\.csv' does not exist"):
        sources.load_source("nowhere/x.csv")


def test_unknown_extension_is_named(tmp_path):
    path = tmp_path / "data.xlsx"
    path.write_text("irrelevant", encoding="utf-8")

    with pytest.raises(DataError, match=r"data\.xlsx.*\.csv, \.jsonl, \.json"):
        sources.load_source(str(path))


def test_missing_column_is_named_with_columns_found(tmp_path):
    path = _write_csv(tmp_path / "t.csv", "sentence,label", ["a,x", "b,y"])

    with pytest.raises(DataError, match=r"no column 'text'; columns found: sentence, label") as error:
        sources.load_source(str(path))
    assert "\n" not in str(error.value)


def test_single_label_is_rejected_with_count(tmp_path):
    path = _write_csv(tmp_path / "one.csv", "text,label", ["a,same", "b,same"])

    with pytest.raises(DataError, match=r"one\.csv' has 1 label with 2 or more examples in column 'label'; expected at least 2"):
        sources.load_source(str(path))


def test_only_empty_texts_is_rejected(tmp_path):
    path = _write_csv(tmp_path / "empty.csv", "text,label", [" ,a", ",b"])

    with pytest.raises(DataError, match="no rows with a non-empty 'text'"):
        sources.load_source(str(path))


# ------------------------------------------------------------------------------------------- partitions


@pytest.mark.parametrize("scheme", ["iid", "dirichlet:0.3"])
def test_partition_covers_each_index_once_and_is_deterministic(scheme):
    labels = np.random.default_rng(0).integers(0, 5, size=503)

    parts = partitions.partition(labels, 7, scheme, seed=11)

    assert len(parts) == 7 and all(len(part) > 0 for part in parts)
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))
    assert all(np.array_equal(a, b) for a, b in zip(parts, partitions.partition(labels, 7, scheme, seed=11)))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, partitions.partition(labels, 7, scheme, seed=12)))


def test_dirichlet_with_small_alpha_is_more_skewed_than_iid():
    labels = np.repeat(np.arange(10), 100)

    def mean_distance_to_global(parts: list[np.ndarray]) -> float:
        shares = [np.bincount(labels[part], minlength=10) / len(part) for part in parts]
        return float(np.mean([0.5 * np.abs(share - 0.1).sum() for share in shares]))

    iid = mean_distance_to_global(partitions.partition(labels, 5, "iid", seed=0))
    skewed = mean_distance_to_global(partitions.partition(labels, 5, "dirichlet:0.1", seed=0))

    assert iid < 0.1
    assert skewed > 0.4


def test_dirichlet_tiny_alpha_still_fills_every_client():
    labels = np.zeros(20, dtype=np.int64)

    parts = partitions.partition(labels, 10, "dirichlet:0.001", seed=0)

    assert all(len(part) > 0 for part in parts)
    assert sum(len(part) for part in parts) == 20


@pytest.mark.parametrize(
    ("scheme", "clients", "message"),
    [
        ("random", 2, "'random'"),
        ("dirichlet", 2, "'dirichlet'"),
        ("dirichlet:abc", 2, "'abc'"),
        ("dirichlet:0", 2, "'0'"),
        ("dirichlet:-1", 2, "'-1'"),
        ("iid", 0, "clients 0"),
        ("iid", 11, "11 exceeds the 10"),
    ],
)
def test_partition_rejects_bad_arguments(scheme, clients, message):
    with pytest.raises(DataError, match=message):
        partitions.partition(np.zeros(10, dtype=np.int64), clients, scheme, seed=0)


def test_parse_partition_scheme():
    assert partitions.parse_partition_scheme("iid") == ("iid", None)
    assert partitions.parse_partition_scheme("dirichlet:0.5") == ("dirichlet", 0.5)
