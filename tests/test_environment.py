"""Offline by default, online only when a source names a hub."""

from fl.run.environment import names_hub_source


def test_embedded_and_local_sources_stay_offline(tmp_path) -> None:
    assert not names_hub_source([])
    assert not names_hub_source(["--model", "default", "--bio-data", "hpo"])
    assert not names_hub_source(["--model", str(tmp_path), "--legal-data", "/data/legal.csv"])


def test_a_hub_model_or_dataset_keeps_the_network() -> None:
    assert names_hub_source(["--model", "bert-base-uncased"])
    assert names_hub_source(["--model=nlpaueb/legal-bert-base-uncased"])
    assert names_hub_source(["--bio-data", "hf:bigbio/hpo@train"])
