"""fedmerge's model folder: how a saved expert, merged or distilled model lies on disk.

The encoder in Hugging Face format (``save_pretrained``; LoRA adapters folded into its weights, and also alone in
``adapter/`` for ``PeftModel.from_pretrained``), so ``AutoModel``/``AutoTokenizer`` load it as is; the
heads in ``heads.safetensors`` and their labels in ``fedmerge.json``; and, when the base encoder is a
sentence-transformers model (Reimers & Gurevych 2019, Sentence-BERT; the default all-MiniLM-L6-v2 is one), the
base's sentence-transformers files, so ``SentenceTransformer(folder)`` loads the new weights with the base's
pooling. They are plain JSON, copied without importing sentence-transformers.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

from safetensors.torch import load_file, save_file
from transformers import AutoModel, PreTrainedTokenizerBase

from fl.modeling.lora import PEFT_FOLDER, adapted, folded_encoder_state, save_adapter
from fl.modeling.model import MultiHeadEncoder

HEADS_FILE = "heads.safetensors"
META_FILE = "fedmerge.json"
MODULES_FILE = "modules.json"  # what makes a folder a sentence-transformers model: its modules, in order
SENTENCE_SETTINGS = ("sentence_bert_config.json", "config_sentence_transformers.json")  # max_seq_length, prompts...
# The sentence-transformers pipelines that compute fedmerge's features (MultiHeadEncoder.embed), L2-normalised
# or not: the encoder at the folder's root, then its mean pooling.
FEDMERGE_PIPELINES = (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"])
MEAN_POOLING = ("mean", ["mean"], ["mean_tokens"])  # pooling_mode of sentence-transformers >= 5; the older flags

log = logging.getLogger(__name__)


def save_merged(
    model: MultiHeadEncoder,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | os.PathLike[str],
    label_names: Mapping[str, Sequence[str]],
) -> Path:
    """Write a folder that AutoModel/AutoTokenizer load as is, plus the heads and their labels.

    When the encoder was loaded from a sentence-transformers folder (its ``name_or_path``: the base, or a folder
    saved here from it) whose modules are the encoder, mean pooling and optionally Normalize, that folder's
    sentence-transformers files come too: ``SentenceTransformer(out_dir)`` then behaves like
    ``SentenceTransformer(base)`` on the new weights, normalisation included, so its embeddings are fedmerge's
    features (``MultiHeadEncoder.embed``) L2-normalised where the base normalises (the default does), texts cut
    at the base's ``max_seq_length``. Any other base gets no such files (``sentence_files``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = model.encoder.name_or_path
    if adapted(model):  # the adapters folded in, and alone as a PEFT folder
        model.encoder.save_pretrained(out, state_dict=folded_encoder_state(model))
        save_adapter(model, out / PEFT_FOLDER, base)
    else:
        model.encoder.save_pretrained(out)
    tokenizer.save_pretrained(out)
    heads = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.heads.state_dict().items()}
    save_file(heads, str(out / HEADS_FILE))
    meta = {"pooling": "mean", "domains": {d: {"labels": list(label_names[d])} for d in model.domains}}
    (out / META_FILE).write_text(json.dumps(meta, indent=2))
    if base and Path(base).is_dir() and Path(base).resolve() != out.resolve():
        for name in sentence_files(Path(base)):
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(base) / name, out / name)
    return out


def sentence_files(base: Path) -> list[str]:
    """The sentence-transformers files of the folder `base`, relative to it, that a folder saved from it copies:
    none when it has no modules.json, and none (logged) when its modules compute something else than fedmerge's
    features, which SentenceTransformer could then not reproduce with the base's pooling."""
    if not (base / MODULES_FILE).is_file():
        return []
    modules = json.loads((base / MODULES_FILE).read_text())
    unlike = unlike_fedmerge(base, modules)
    if unlike:
        log.warning("%s: %s; its saved models get no sentence-transformers files", base, unlike)
        return []
    configs = [f"{m['path']}/config.json" for m in modules if m["path"] and (base / m["path"] / "config.json").is_file()]
    return [MODULES_FILE, *(name for name in SENTENCE_SETTINGS if (base / name).is_file()), *configs]


def unlike_fedmerge(base: Path, modules: list[dict[str, str]]) -> str:
    """How the sentence-transformers pipeline of `base` differs from fedmerge's features, or '' when it does not."""
    kinds = [m["type"].rsplit(".", 1)[-1] for m in modules]
    if kinds not in FEDMERGE_PIPELINES or modules[0]["path"]:
        return f"its modules are {' -> '.join(kinds)}; expected Transformer (at the folder's root) -> Pooling [-> Normalize]"
    pooling = json.loads((base / modules[1]["path"] / "config.json").read_text())
    mode = pooling.get("pooling_mode") or [k.removeprefix("pooling_mode_") for k, on in pooling.items() if k.startswith("pooling_mode_") and on is True]
    if mode not in MEAN_POOLING:
        return f"its pooling is {mode}; fedmerge's encoder and heads use mean pooling"
    settings = base / "config_sentence_transformers.json"
    if settings.is_file() and json.loads(settings.read_text()).get("default_prompt_name"):
        return "it puts a default prompt before every text; fedmerge's encoder reads the texts as they are"
    return ""


def load_merged(path: str | os.PathLike[str]) -> tuple[MultiHeadEncoder, dict[str, list[str]]]:
    """Inverse of save_merged: the full multi-head model and each domain's label names."""
    folder = Path(path)
    meta = json.loads((folder / META_FILE).read_text())
    labels = {d: info["labels"] for d, info in meta["domains"].items()}
    model = MultiHeadEncoder(AutoModel.from_pretrained(folder), {d: len(v) for d, v in labels.items()})
    model.heads.load_state_dict(load_file(str(folder / HEADS_FILE)))
    return model, labels
