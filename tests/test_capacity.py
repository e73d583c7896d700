"""The pre-flight memory check sees the Ray options: --client-cpus sets how many actors this machine hosts, and on a
cluster (--ray-address) a driver's node too small for one client holds the server side only."""

from dataclasses import replace

import pytest

from fl.federation.capacity import GLOBAL_MODEL_COPIES, CapacityError, actors_here, check_fits, estimate_peak
from fl.modeling.model import default_model_path
from fl.run.config import RunConfig

GIB = 2**30


@pytest.fixture(scope="module")
def model() -> str:
    return str(default_model_path())


@pytest.mark.parametrize("cores", [1, 2, 3, 16])
def test_by_default_one_actor_per_client_up_to_the_cores(cores: int) -> None:
    assert [actors_here(n, 0, cores) for n in (1, 2, 5, 100)] == [min(n, cores) for n in (1, 2, 5, 100)]


def test_client_cpus_sets_how_many_actors_fit() -> None:
    assert actors_here(8, 4, cores=16) == 4
    assert actors_here(2, 4, cores=16) == 2  # never more than one per client
    assert actors_here(8, 32, cores=16) == 0


def test_fewer_actors_with_more_cpus_each_need_less_memory(model: str) -> None:
    config = replace(RunConfig(), clients_per_domain=4)

    split = check_fits(config, model, available=64 * GIB, cores=16)
    wide = check_fits(config, model, available=64 * GIB, cores=16, client_cpus=4)

    assert (split.num_actors, wide.num_actors) == (8, 4)
    assert wide.peak_bytes < split.peak_bytes


def test_a_run_refused_here_fits_when_its_clients_run_on_the_cluster(model: str) -> None:
    config = replace(RunConfig(), clients_per_domain=8)

    with pytest.raises(CapacityError, match=r"^--clients-per-domain 8: 16 clients need about [\d.]+ GiB on this machine") as error:
        check_fits(config, model, available=12 * GIB, cores=16)
    found = check_fits(config, model, available=12 * GIB, cores=16, client_cpus=32, cluster=True)  # no client fits on this node

    assert "\n" not in str(error.value)
    assert found.num_actors == 0 and found.cluster
    assert found.peak_bytes == estimate_peak(GLOBAL_MODEL_COPIES + 16, 0, found.model_bytes)  # the server side only


def test_a_cluster_node_that_can_host_clients_counts_them(model: str) -> None:
    config = replace(RunConfig(), clients_per_domain=8)

    with pytest.raises(CapacityError, match=r"16 clients need about [\d.]+ GiB on this node of the cluster \([\d.]+ GiB base \+ 4 actors"):
        check_fits(config, model, available=8 * GIB, cores=16, client_cpus=4, cluster=True)


def test_a_client_that_needs_more_cpus_than_a_local_ray_has_is_refused_in_one_line() -> None:
    with pytest.raises(CapacityError, match=r"^--client-cpus 32: a client needs more CPUs than this machine's 16; expected at most 16 "):
        check_fits(RunConfig(), "unused: refused before the model is read", available=64 * GIB, cores=16, client_cpus=32)


def test_lora_replies_are_counted_at_the_adapters_size() -> None:
    path = str(default_model_path())
    full = check_fits(RunConfig(), path, available=16 * 2**30, streamed=True)
    lora = check_fits(replace(RunConfig(), peft="lora"), path, available=16 * 2**30, streamed=True)

    assert lora.reply_bytes == 4 * 8 * (384 + 384) * 2 * 6  # rank 8, query and value of 6 layers of 384 units
    assert lora.peak_bytes < full.peak_bytes and lora.max_clients > 100 * full.max_clients
    assert "replies of 0.3 MiB" in lora.describe()
