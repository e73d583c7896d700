"""The ServerApp of ``flwr run`` (simulation or deployment, pyproject.toml's ``[tool.flwr.app]``).

It reads the run config (the experiment's options, the strategies with their rules' options, the output
folder) and runs the whole experiment of ``sims/bio_legal.py`` on the grid, or, with ``server-data = false``,
the federated-only run of ``fl.studies.federated_run``. This module is only the entry point: the rounds live in
``fl.federation.rounds``, the phases in ``fl.studies.experiment``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fl.data.partitions import parse_partition_scheme
from fl.federation.rounds import run_on_grid
from fl.run.checkpoint import RunFolder, check_out, run_identity
from fl.run.config import ConfigError, RunConfig, split_run_config
from fl.run.versions import package_versions
from fl.studies.experiment import run_experiment
from fl.studies.federated_run import run_federated
from strategies.options import parse_bool
from strategies.rules import RuleSetting, check_adapters, check_server_text, parse_names, settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AppOptions:
    """The run config of ``flwr run``: the experiment's options plus what the app itself needs."""

    config: RunConfig
    strategies: list[RuleSetting]
    out: Path
    resume: bool  # continue the run in `out` from its last checkpoint (fl.run.checkpoint)
    overwrite: bool  # replace the results and checkpoints in `out`


def app_options(run_config: Mapping[str, object]) -> AppOptions:
    """Parse and check the run config before any model or data is loaded; an OptionError names the bad value."""
    record = split_run_config(run_config)
    strategies = settings(parse_names(record.app.get("strategies", "fedavg,fedprox")), record.rule_values)
    if "out" not in record.app:
        raise ConfigError("run config has no 'out': expected an absolute output folder")
    out = Path(record.app["out"]).expanduser()
    if not out.is_absolute():  # the app runs from a packaged copy, so a relative folder would land inside it
        raise ConfigError(f"out '{record.app['out']}' is relative: expected an absolute path (or one starting with ~)")
    parse_partition_scheme(record.config.partition)
    check_server_text(strategies, record.config.server_data)
    check_adapters(strategies, record.config.peft)
    resume, overwrite = (parse_bool(key, record.app.get(key, "false")) for key in ("resume", "overwrite"))
    check_out(out, run_identity(record.config, strategies), resume, overwrite)
    return AppOptions(record.config, strategies, out, resume, overwrite)


def show_fedmerge_logs() -> None:
    """Send fedmerge's INFO logs to stderr in the ServerApp process (Flower configures only its own logger)."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    for name in ["fl", "strategies"]:
        logger = logging.getLogger(name)
        if not logger.handlers:
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """``flwr run``: every strategy on the connected SuperNodes, results written to the run config's ``out``."""
    show_fedmerge_logs()
    options = app_options(context.run_config)
    config = options.config
    names = ",".join(s.name for s in options.strategies)
    log.info("fedmerge: strategies %s, %d rounds, results to %s", names, config.rounds, options.out)
    folder = RunFolder(options.out, run_identity(config, options.strategies))
    folder.open(overwrite=options.overwrite)
    if not config.server_data:
        run_federated(grid, config, options.strategies, folder, package_versions())
        return

    from fl.modeling.model import check_model
    from fl.run.domains import load_domains

    model_path = check_model(config.model, config.max_length)
    data = load_domains(config)
    run_experiment(config, model_path, data, options.strategies, folder, package_versions(), runner=functools.partial(run_on_grid, grid))
