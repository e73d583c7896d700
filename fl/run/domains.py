"""The run's domains loaded as its config says: sources, sizes, seed and columns in one call.

Every place that needs a domain's data (the baselines, each Flower client, the scripts) loads it through here, so a
client and the server always see the same split.
"""

from __future__ import annotations

from fl.data.splits import DomainData, load_domain
from fl.data.user_files import DataError
from fl.run.config import RunConfig


def load_run_domain(config: RunConfig, name: str) -> DomainData:
    """One domain of the run: its source (with its own columns, if --domain names them) split and subsampled with
    the run's sizes and seed."""
    text_column, label_column, group_column = config.columns_of(name)
    return load_domain(
        name,
        config.domain_sources[name],
        train_size=config.train_size,
        test_size=config.test_size,
        seed=config.seed,
        text_column=text_column,
        label_column=label_column,
        group_column=group_column,
    )


def load_domains(config: RunConfig) -> dict[str, DomainData]:
    """Every domain of the run; a --train-size below a domain's number of labels is refused (it would leave labels
    that no client and no probe has seen; a smaller test set is only a coarser measurement)."""
    data = {name: load_run_domain(config, name) for name in config.domains}
    for name, domain in data.items():
        if config.train_size < domain.num_labels:
            raise DataError(
                f"--train-size {config.train_size}: domain {name} has {domain.num_labels} labels; expected at least "
                f"{domain.num_labels} (one example per label)"
            )
    return data
