"""A client's copy of the global model from what the server sent: the weights that change, into a model that already
holds the frozen ones (the LoRA base, or the frozen word embeddings), after checking those are the server's."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fl.modeling.errors import ModelError
from fl.modeling.model import MultiHeadEncoder
from strategies.lora import home_digest, sent_down


def load_received(model: MultiHeadEncoder, state: Mapping[str, torch.Tensor], digest: str, *, embeddings: bool = True) -> None:
    """Load the global weights the server sent (``sent_down``: all but what stays home) into this client's own model,
    after checking that the weights it kept are the server's (``base-digest``) and that the message holds every weight
    that changes. ``embeddings``: whether the word embeddings travel (trained, or permuted per client)."""
    own = model.state_dict()
    expected = sent_down(own, embeddings=embeddings)
    if getattr(model, "home_digest", None) is None:
        model.home_digest = home_digest(own, expected)  # the kept weights never change: hashed once per model
    if digest != model.home_digest:
        raise ModelError(f"this client's frozen base weights (hash {model.home_digest}) differ from the server's (hash {digest or 'none sent'}): expected the same --model files on every node")
    unknown = next((k for k in state if k not in own), None)
    if unknown is not None:
        raise ModelError(f"the server sent '{unknown}', which this client's model lacks: expected the same --peft and --lora-* options on every node")
    missing = next((k for k in expected if k not in state), None)
    if missing is not None:
        raise ModelError(f"the server's message lacks '{missing}': expected every trained weight and head of the model")
    model.load_state_dict(state, strict=False)
