"""Every seed a run derives from its one ``--seed``, each formula named by what it seeds.

One place, so that two streams never share a seed by accident. The formulas are fixed: changing one changes every
published number of the runs that use it.
"""

from __future__ import annotations


def expert_training(seed: int, domain_index: int) -> int:
    """Batch order and dropout of the expert of the domain_index-th domain."""
    return seed + 101 * (domain_index + 1)


def multitask_training(seed: int) -> int:
    """Batch order and dropout of the multi-task model."""
    return seed + 7


def client_training(seed: int, server_round: int, domain_index: int, partition_id: int) -> int:
    """Batch order, dropout and any poisoning noise of one client in one round: new every round, own per client."""
    return seed + 1000 * server_round + 17 * partition_id + 7919 * domain_index


def client_permutation(seed: int, client_index: int) -> int:
    """The random permutation of the base that a client starts from with ``--init permuted``."""
    return 1_000_003 * (seed + 1) + client_index


def adapter_start(seed: int) -> int:
    """The LoRA factors A every model of a run starts from (``--peft lora``): one draw shared by the server and
    every client, so that their adapters mean the same thing."""
    return 2_000_003 * (seed + 1)
