"""PEFT's own merge of LoRA adapters (``add_weighted_adapter``), as the reference a PEFT user would reach for.

The one-shot merges of LoRA experts put fedmerge's rules (strategies.lora) next to PEFT's combinations on the same
adapters: ``linear`` (weighted sums of A and of B, so cross terms as FedIT), ``cat`` (the adapters stacked: the exact
weighted sum of the updates, at the sum of the ranks), ``svd`` (that sum truncated to the rank by SVD, as
``lora-exact``) and ``ties`` (TIES on A and on B separately). Each expert's weight is its domain's share of the
training examples, as fedmerge's rules weigh them. The merged adapter is folded into the base weights of a state
of fedmerge's adapted model (B left at zero), since ``cat`` has another rank than the model's adapters.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from fl.modeling.lora import ADAPTER, BASE_LAYER
from fl.modeling.model import MultiHeadEncoder
from strategies.lora import A_PART, B_PART

COMBINATIONS = ("linear", "cat", "svd", "ties")
MERGED = "merged"
PEFT_PREFIX = "base_model.model."  # what PEFT puts before a wrapped model's keys


@dataclass(frozen=True)
class PeftCombination:
    """One of PEFT's combinations of adapters, as a one-shot row (``one-shot-peft-<combination>``)."""

    combination: str
    density: float = 0.2  # ties: the share of each factor kept, as fedmerge's ties-density

    @property
    def name(self) -> str:
        return f"peft-{self.combination}"


def peft_merged(model: MultiHeadEncoder, start: Mapping[str, torch.Tensor], experts: Mapping[str, Mapping[str, torch.Tensor]],
                weights: Mapping[str, float], combination: PeftCombination) -> dict[str, torch.Tensor]:
    """``start`` with the experts' adapters merged by PEFT and folded into the base weights, and each domain's head
    from its own expert."""
    from peft import get_peft_model, set_peft_model_state_dict
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModel

    encoder = AutoModel.from_config(model.encoder.config)
    encoder.load_state_dict({k.removeprefix("encoder.").replace(BASE_LAYER, ""): v for k, v in start.items()
                             if k.startswith("encoder.") and A_PART not in k and B_PART not in k})
    config = copy.copy(model.lora_config)
    names = list(experts)
    peft_model = get_peft_model(encoder, config, adapter_name=names[0])
    for name in names[1:]:
        peft_model.add_adapter(name, config)
    for name, state in experts.items():
        factors = {PEFT_PREFIX + k.removeprefix("encoder.").replace(f".{ADAPTER}.", "."): v for k, v in state.items()
                   if k.startswith("encoder.") and (A_PART in k or B_PART in k)}
        set_peft_model_state_dict(peft_model, factors, adapter_name=name)
    total = sum(weights[n] for n in names)
    extra = {"density": combination.density} if combination.combination == "ties" else {}
    peft_model.add_weighted_adapter(names, [weights[n] / total for n in names], MERGED, combination_type=combination.combination, **extra)

    merged = {k: v.clone() for k, v in start.items()}
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and MERGED in module.lora_A:
            key = "encoder." + name.removeprefix(PEFT_PREFIX) + f"{BASE_LAYER}.weight"
            merged[key] += module.get_delta_weight(MERGED).detach().to(merged[key].dtype)
    for domain, state in experts.items():
        merged.update({k: v for k, v in state.items() if k.startswith(f"heads.{domain}.")})
    return merged
