"""Merging LoRA adapters: in their factors (FedIT, FFA-LoRA) or in the updates they stand for (FlexLoRA).

A LoRA module adds ``scale * B @ A`` to a frozen weight (Hu et al. 2022; ``A``: rank x in, ``B``: out x rank,
scale = alpha / rank). Clients send ``A`` and ``B``; a merge rule can treat them in one of three ways, declared per
rule in the registry (``Rule.adapters``):

* ``factors``: the rule runs on A and B as on any weights. For FedAvg this is FedIT (Zhang et al. 2024), and it is
  not the mean of the updates: for two clients with shares p and 1 - p,
  mean(B) mean(A) - mean(B A) = -p (1 - p) (B1 - B2)(A1 - A2) (``fedit_cross_term``).
* ``frozen-a``: FFA-LoRA (Sun et al., ICLR 2024): every client keeps A at the shared seeded start and trains only B,
  so the mean of B times that A is exactly the mean update.
* ``products``: the rule runs on each module's update ``scale * B @ A`` (a dense out x in matrix), and the merged
  update is re-factored to the adapter's rank by a truncated SVD, as FlexLoRA (Bai et al., NeurIPS 2024):
  ``B = U_r S_r / scale``, ``A = V_r^T``. A's rows stay orthonormal, so a direction the merge left empty keeps a
  live A row (a zero B column then learns, as at LoRA's own start) instead of dying as a zero pair would. The
  share of the merged update's energy (squared singular values) beyond the rank is reported per round; it is 0
  when the clients' updates span at most ``rank`` directions, and the merge is then exact.

Keys: a module's factors are any pair ``<module>.lora_A.<...>`` / ``<module>.lora_B.<...>`` (PEFT's names, with or
without the adapter name); every other key (the domain heads) is merged as the rule merges weights.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from strategies.aggregation import UpdateError
from strategies.update import Clients, ClientUpdate, MergeContext, State

A_PART, B_PART = ".lora_A.", ".lora_B."
UPDATE = ".lora_update"  # a module's dense update, in the products' space


@dataclass(frozen=True)
class Module:
    """One adapted module: the keys of its two factors."""

    name: str
    a_key: str
    b_key: str

    @property
    def update_key(self) -> str:
        return self.name + UPDATE


def adapter_modules(state: State) -> list[Module]:
    """Every adapted module of a state, in key order; an A without its B (or the reverse) is refused."""
    modules = []
    for key in state:
        if A_PART in key:
            b_key = key.replace(A_PART, B_PART)
            if b_key not in state:
                raise UpdateError(f"adapter key '{key}' has no '{b_key}' beside it")
            modules.append(Module(key.split(A_PART)[0], key, b_key))
        elif B_PART in key and key.replace(B_PART, A_PART) not in state:
            raise UpdateError(f"adapter key '{key}' has no '{key.replace(B_PART, A_PART)}' beside it")
    return modules


def has_adapters(keys: Iterable[str]) -> bool:
    """Whether a state (or its keys) holds LoRA factors."""
    return any(A_PART in key for key in keys)


def trained_by_lora(key: str, freeze_a: bool) -> bool:
    """Whether an encoder key trains (and is sent) under LoRA: the adapters' factors, B only with A frozen."""
    return B_PART in key or (A_PART in key and not freeze_a)


def client_keys(keys: Iterable[str], domain: str, *, freeze_a: bool = False, embeddings: bool = True) -> list[str]:
    """The keys a client of `domain` trains and sends: its own head and the encoder, without the word embeddings
    when they stay home (frozen, so equal to the server's), or with adapters only their factors (B alone with A
    frozen)."""
    keys = list(keys)
    head = f"heads.{domain}."
    adapters = has_adapters(keys)

    def trained(key: str) -> bool:
        if adapters:
            return trained_by_lora(key, freeze_a)
        return embeddings or "word_embeddings" not in key

    return [k for k in keys if k.startswith(head) or (k.startswith("encoder.") and trained(k))]


def sent_down(keys: Iterable[str], *, embeddings: bool = True) -> list[str]:
    """The keys of the global state the server sends. What never changes stays out, since every client loads it
    itself (checked by ``home_digest``): with adapters, the frozen base; without, the word embeddings when they are
    frozen (``embeddings`` False: clients neither train nor send them)."""
    keys = list(keys)
    if has_adapters(keys):
        return [k for k in keys if not k.startswith("encoder.") or A_PART in k or B_PART in k]
    if embeddings:
        return keys
    return [k for k in keys if not (k.startswith("encoder.") and "word_embeddings" in k)]


def update_of(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """The dense update ``scale * B @ A`` of one module, in float32."""
    return (b.float() @ a.float()).mul_(scale)


def as_products(state: State, modules: list[Module], scale: float) -> dict[str, torch.Tensor]:
    """A state with each module's factors replaced by its update (absent factors: the module is left out)."""
    factor_keys = {m.a_key for m in modules} | {m.b_key for m in modules}
    products = {k: v for k, v in state.items() if k not in factor_keys}
    for module in modules:
        if module.a_key in state and module.b_key in state:
            products[module.update_key] = update_of(state[module.a_key], state[module.b_key], scale)
    return products


def refactor(update: torch.Tensor, rank: int, scale: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(B, A, share of the energy dropped): the best rank-``rank`` factors of ``update`` (Eckart-Young), with
    ``scale * B @ A`` the truncated update and A's rows orthonormal."""
    u, s, vh = torch.linalg.svd(update.double(), full_matrices=False)
    energy = float((s**2).sum())
    dropped = float((s[rank:] ** 2).sum()) / energy if energy > 0 else 0.0
    b = (u[:, :rank] * s[:rank]).div_(scale)
    return b.float(), vh[:rank].float().contiguous(), dropped


def merge_products(
    function: Callable[..., dict[str, torch.Tensor]], global_state: State, clients: Clients, context: MergeContext, arguments: Mapping[str, object]
) -> dict[str, torch.Tensor]:
    """Run a rule on the clients' updates ``scale * B @ A`` and re-factor what it merged to the adapter rank.

    The rule sees the global update as the global state, so rules over deltas (task arithmetic, TIES...) take
    differences of updates. The largest share of energy dropped over the modules goes to ``context.round_notes``.
    """
    modules = adapter_modules(global_state)
    scale = context.adapter_scale
    products = [ClientUpdate(c.name, c.identity, as_products(c.state, modules, scale), c.weight, c.statistics) for c in clients]
    merged = function(as_products(global_state, modules, scale), products, context, **arguments)
    factors = {k: v for k, v in merged.items() if not k.endswith(UPDATE)}
    dropped = 0.0
    for module in modules:
        if module.update_key not in merged:
            continue
        a_global = global_state[module.a_key]
        b, a, share = refactor(merged[module.update_key], a_global.shape[0], scale)
        factors[module.a_key], factors[module.b_key] = a.to(a_global.dtype), b.to(global_state[module.b_key].dtype)
        dropped = max(dropped, share)
    context.round_notes["lora-energy-dropped"] = dropped
    return factors


def check_frozen_a(clients: Clients) -> None:
    """FFA-LoRA's clients train B only and send no A (the server's A is theirs): a reply holding an A is refused."""
    for client in clients:
        sent = next((key for key in client.state if A_PART in key), None)
        if sent is not None:
            raise UpdateError(f"{client.name}: sent '{sent}', an A factor, which ffa keeps frozen at the shared start: expected B factors and the head only")


def home_digest(state: Mapping[str, torch.Tensor | np.ndarray], sent: Iterable[str]) -> str:
    """A hash of the weights the server does not send (``sent_down``'s complement): a client that loads them itself
    checks it against the server's, so a different download, revision or global model is refused before training."""
    sent = set(sent)
    digest = hashlib.sha256()
    for key in sorted(k for k in state if k not in sent):
        digest.update(key.encode())
        value = state[key]
        digest.update((value.detach().to("cpu").contiguous().numpy() if isinstance(value, torch.Tensor) else np.ascontiguousarray(value)).tobytes())
    return digest.hexdigest()[:16]
