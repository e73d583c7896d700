"""LoRA adapters on the shared encoder, through Hugging Face PEFT: how a client's model gets them, what it trains
and sends, and how a model with adapters is saved.

PEFT's ``inject_adapter_in_model`` puts a LoRA layer (Hu et al. 2022, "LoRA: Low-Rank Adaptation of Large Language
Models") around each target linear layer of the encoder, in place: the encoder stays the Hugging Face model it was,
its target weights move to ``<module>.base_layer.*`` and the factors are ``<module>.lora_A.default.weight`` (rank x
in, seeded) and ``<module>.lora_B.default.weight`` (out x rank, zeros), so the adapted model starts as the base.
How the server merges them is ``strategies.lora``. A saved model has the adapters folded into the weights (a folder
``AutoModel`` loads) and, beside it, the adapters alone as a PEFT folder (``PeftModel.from_pretrained``).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from fl.modeling.errors import ModelError
from fl.modeling.model import MultiHeadEncoder, meta_encoder
from fl.modeling.train_settings import LoraSettings
from strategies.lora import A_PART, B_PART, adapter_modules, update_of

ADAPTER = "default"  # PEFT's name for a model's one adapter
BASE_LAYER = ".base_layer"
PEFT_FOLDER = "adapter"  # the merged adapter, inside a saved model's folder
# Attention projections by model type where PEFT's own table (peft.utils.constants) has none.
OWN_TARGETS = {"distilbert": ("q_lin", "v_lin")}


def target_modules(encoder: nn.Module, settings: LoraSettings) -> tuple[str, ...]:
    """The module names adapters go on, refused in one line when the encoder has no such linear layer."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS

    model_type = encoder.config.model_type
    targets = settings.targets or tuple(PEFT_TARGETS.get(model_type, ())) or OWN_TARGETS.get(model_type, ())
    if not targets:
        raise ModelError(f"--lora-targets: no default target modules for model type '{model_type}': expected the names of its attention's linear layers")
    linear = {name.rsplit(".", 1)[-1] for name, module in encoder.named_modules() if isinstance(module, nn.Linear)}
    missing = [t for t in targets if t not in linear]
    if missing:
        raise ModelError(f"--lora-targets {','.join(targets)}: the {model_type} encoder has no linear layer '{missing[0]}': expected some of {', '.join(sorted(linear))}")
    return targets


def add_adapters(model: MultiHeadEncoder, settings: LoraSettings, seed: int) -> MultiHeadEncoder:
    """Put seeded LoRA adapters on the encoder's target modules, in place: every client and the server draw the same A."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout, target_modules=list(target_modules(model.encoder, settings)))
    device = model.device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject_adapter_in_model(config, model.encoder, adapter_name=ADAPTER)
    model.encoder.to(device)
    model.lora_config = config  # what the PEFT folder is written with
    return model


def adapted(model: MultiHeadEncoder) -> bool:
    return hasattr(model, "lora_config")


def folded_encoder_state(model: MultiHeadEncoder) -> dict[str, torch.Tensor]:
    """The encoder's weights with every adapter added in (W + scale B A), under the base model's own key names."""
    state = {k: v.detach().to("cpu") for k, v in model.encoder.state_dict().items()}
    scale = model.lora_config.lora_alpha / model.lora_config.r
    folded = {k.replace(BASE_LAYER, ""): v.clone() for k, v in state.items() if A_PART not in k and B_PART not in k}
    for module in adapter_modules(state):
        weight = f"{module.name}.weight"
        folded[weight] += update_of(state[module.a_key], state[module.b_key], scale).to(folded[weight].dtype)
    return folded


def save_adapter(model: MultiHeadEncoder, folder: Path, base: str) -> Path:
    """The adapters alone as a PEFT folder: ``PeftModel.from_pretrained(AutoModel.from_pretrained(base), folder)``."""
    folder.mkdir(parents=True, exist_ok=True)
    config = copy.copy(model.lora_config)
    config.base_model_name_or_path = base
    config.save_pretrained(str(folder))
    weights = {
        "base_model.model." + k.replace(f".{ADAPTER}.", "."): v.detach().to("cpu").contiguous()
        for k, v in model.encoder.state_dict().items()
        if A_PART in k or B_PART in k
    }
    save_file(weights, str(folder / "adapter_model.safetensors"))
    return folder


def with_adapters(model: MultiHeadEncoder, settings: LoraSettings | None, seed: int) -> MultiHeadEncoder:
    """The model with seeded adapters when ``settings`` asks for them (--peft lora), else as it is."""
    return model if settings is None else add_adapters(model, settings, seed)


def check_lora(settings: LoraSettings | None, model_path: str) -> None:
    """Refuse, before any weights load, target modules the encoder lacks (its architecture built on the meta device)."""
    if settings is None:
        return
    target_modules(meta_encoder(model_path), settings)
