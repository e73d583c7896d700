"""AdaMerging: merge coefficients per client and per layer, learnt from unlabelled text at the server.

Yang et al., "AdaMerging: Adaptive Model Merging for Multi-Task Learning", ICLR 2024 (layer-wise variant). Task
arithmetic gives every task vector one coefficient; AdaMerging gives each task vector one coefficient per layer and
learns them without labels, by minimising the Shannon entropy of the merged model's predictions on each task's
unlabelled text (the paper shows entropy tracks the loss on test data). Here a "layer" is one parameter tensor of
the encoder, a task vector is a client's delta from the global state, and each domain's texts go through that
domain's head. The learnt merge is ``global + sum_k lambda[k, key] * delta_k[key]``.

What the paper leaves open, decided here:
* Start: every coefficient at ``init``; 0 means 1/N, the plain average (the paper starts from task arithmetic's
  0.3, which with six clients is 1.8 times the mean delta), so the optimisation starts from FedAvg.
* Keys learnt: the float tensors every client sent and at least one client changed. Keys only some clients sent
  (a domain's head) take the weighted mean of their senders, as FedAvg; unchanged keys (frozen embeddings) stay.
* Budget: ``steps`` Adam steps (the paper: 500 on a GPU), one batch per domain each, cycling through the batches
  the server holds (``ServerText``); the model runs in eval mode, so a step is deterministic.
The entropy before and after, and each client's mean coefficient, are kept in the context's notes (results.json).
"""

from __future__ import annotations

import torch

from strategies.aggregation import UpdateError
from strategies.task_vectors import integers, keys_of
from strategies.update import Clients, MergeContext, ServerText, State


def adamerging(global_state: State, clients: Clients, context: MergeContext, *, steps: int, lr: float, init: float) -> dict[str, torch.Tensor]:
    """global + per-key coefficients x the clients' deltas, the coefficients minimising the mean prediction entropy."""
    text = context.server_text
    if text is None:
        raise UpdateError("adamerging: the server holds no unlabelled text to learn its coefficients from (server-data = false)")
    senders = keys_of(clients)
    merged = integers(clients)
    learnt: list[str] = []
    for key, group in senders.items():
        if key in merged:
            continue
        if len(group) == len(clients) and any(not torch.equal(c.state[key], global_state[key]) for c in group):
            learnt.append(key)
        else:
            merged[key] = weighted_mean(group, key).to(global_state[key].dtype)
    domains = [d for d in text.batches if any(k.startswith(f"heads.{d}.") for k in senders)]
    if not learnt or not domains:
        raise UpdateError(f"adamerging: nothing to learn ({len(learnt)} changed keys shared by every client, {len(domains)} domains with text and a head)")
    deltas = {key: torch.stack([c.state[key].float() - global_state[key].float() for c in clients]) for key in learnt}
    coefficients = torch.full((len(learnt), len(clients)), init or 1.0 / len(clients), requires_grad=True)
    optimizer = torch.optim.Adam([coefficients], lr=lr)

    def state_at(values: torch.Tensor) -> dict[str, torch.Tensor]:
        moved = {key: global_state[key].float() + torch.tensordot(values[i], deltas[key], dims=1) for i, key in enumerate(learnt)}
        return {**global_state, **merged, **moved}

    entropies = []
    for step in range(steps):
        loss = mean_entropy(text, state_at(coefficients), domains, step)
        entropies.append(float(loss.detach()))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        final = state_at(coefficients.detach())
        entropies.append(float(mean_entropy(text, final, domains, steps)))
    for i, client in enumerate(clients):
        note = context.notes.setdefault(client.name, {})
        note.update({"adamerging-coefficient-mean": float(coefficients[:, i].mean()), "adamerging-entropy": [entropies[0], entropies[-1]]})
    merged.update({key: final[key].to(global_state[key].dtype) for key in learnt})
    return merged


def mean_entropy(text: ServerText, state: State, domains: list[str], step: int) -> torch.Tensor:
    """The mean over domains of the mean prediction entropy on one batch of each domain's unlabelled text."""
    total = torch.zeros(())
    for domain in domains:
        logits = text.logits(state, domain, step % text.batches[domain]).float().cpu()
        log_p = torch.log_softmax(logits, dim=-1)
        total = total - (log_p.exp() * log_p).sum(-1).mean()
    return total / len(domains)


def weighted_mean(group: Clients, key: str) -> torch.Tensor:
    total = sum(c.weight for c in group)
    return sum(c.state[key].float() * (c.weight / total) for c in group)  # type: ignore[return-value]
