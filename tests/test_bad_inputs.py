"""Every bad input a user can give the headline CLI, and its answer: one line `error: ...` naming the value and
what was expected, exit code 2, before any weights load, training starts or --out is created."""

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fl.run.config import ConfigError, RunConfig, split_run_config
from sims import bio_legal
from strategies.aggregation import UpdateError

REPO = Path(__file__).resolve().parents[1]

# (argv, files written to {tmp} first, a fragment of the one-line message). Placeholders: {tmp} a fresh folder;
# {bio} and {legal} toy CSVs (3 labels each); {tiny} a tiny BERT folder (128 positions); {t5}, {gpt2}, {bare} folders
# holding only the config.json of a T5, a GPT-2 and a BERT.
CASES = [
    # options
    (["--rounds", "0"], {}, "--rounds 0: expected an integer >= 1"),
    (["--seed", "-5"], {}, "--seed -5: expected an integer >= 0"),
    (["--lr", "inf"], {}, "--lr inf: expected a finite number > 0"),
    (["--head-lr", "nan"], {}, "--head-lr nan: expected a finite number > 0"),
    (["--lr", "0"], {}, "--lr 0.0: expected a finite number > 0"),
    (["--partition", "dirichlet:-1"], {}, "dirichlet:-1"),
    (["--clients-per-domain", "400", "--strategies", "median"], {}, "--clients-per-domain 400: 800 clients need about"),
    (["--clients-per-domain", "400", "--strategies", "ties", "--clients-per-round", "300"], {}, "--clients-per-round 300: 800 clients need about"),
    (["--clients-per-round", "3"], {}, "--clients-per-round 3: expected 'all', a count 1..2"),
    (["--device", "tpu9"], {}, "--device tpu9: expected a torch device such as cpu, cuda or cuda:1"),
    (["--reply-timeout", "0"], {}, "--reply-timeout 0.0: expected a finite number of seconds > 0"),
    (["--on-node-loss", "retry"], {}, "--on-node-loss retry: expected one of fail, continue"),
    (["--repair", "distill:x"], {}, "--repair distill:x: expected distill:STEPS with STEPS a whole number >= 1"),
    *([] if torch.cuda.is_available() else [(["--device", "cuda"], {}, "--device cuda: this machine has no CUDA device torch can use")]),
    # merge rules and their options
    (["--strategies", "fedavg,bogus"], {}, "bogus"),
    (["--strategies", "fedavg,fedavg"], {}, "fedavg listed more than once"),
    (["--strategies", "fedprox", "--fedprox-mu", "nan"], {}, "fedprox-mu nan: expected a number >= 0"),
    (["--strategies", "fedprox", "--fedprox-mu", "inf"], {}, "fedprox-mu inf: expected a number >= 0"),
    (["--strategies", "ties", "--ties-density", "0"], {}, "ties-density 0: expected a number > 0 and <= 1"),
    (["--strategies", "fedavg", "--ties-density", "0.3"], {}, "--ties-density is an option of ties, which --strategies fedavg does not select"),
    # LoRA clients (--peft lora)
    (["--peft", "qlora"], {}, "--peft qlora: expected one of none, lora"),
    (["--peft", "lora", "--lora-rank", "0"], {}, "--lora-rank 0: expected an integer >= 1"),
    (["--peft", "lora", "--model", "{tiny}", "--lora-targets", "query,nope"], {}, "--lora-targets query,nope: the bert encoder has no linear layer 'nope'"),
    (["--peft", "lora", "--strategies", "fedavg,aligned"], {}, "strategy 'aligned' cannot merge LoRA adapters (it permutes"),
    (["--strategies", "ffa"], {}, "strategy 'ffa' merges LoRA adapters: expected --peft lora"),
    # the run's domains (--domain NAME=SOURCE, repeatable)
    (["--domain", "bio=hpo"], {}, "--domain bio=hpo: 1 domain given; expected at least two to merge"),
    (["--domain", "bio"], {}, "--domain bio: expected NAME=SOURCE[,text=COLUMN][,label=COLUMN][,group=COLUMN]"),
    (["--domain", "bio=hpo", "--domain", "bio=licenses"], {}, "--domain bio: the domain is given more than once; expected each name once"),
    (["--domain", "Bio=hpo", "--domain", "legal=licenses"], {}, "name 'Bio' is not lower-case letters, digits, '-' or '_'"),
    (["--domain", "bio=hpo,txt=body", "--domain", "legal=licenses"], {}, "'txt=body' is not one of text=COLUMN, label=COLUMN, group=COLUMN"),
    (["--domain", "fin={bio}", "--domain", "legal=licenses", "--bio-data", "{legal}"], {}, "with --domain, give every domain as --domain NAME=SOURCE"),
    (["--domain", "bio=nosuch", "--domain", "legal=licenses"], {}, "data source 'nosuch' is not"),
    (["--domain", "a=hpo;b=licenses"], {}, "';' separates domains in a run config; give one --domain per domain"),
    (["--attack", "scale:1e40:1"], {}, "--attack scale:1e40:1: F 1e+40 would overflow a round's float32 sum; expected at most 1e+20"),
    (["--attack", "noise:1e25:1"], {}, "SIGMA 1e+25 would overflow"),
    # the model
    (["--model", "{tmp}"], {}, "is not a model folder: expected a directory with config.json"),
    (["--model", "{t5}"], {}, "is an encoder-decoder (t5): expected an encoder such as BERT, RoBERTa"),
    (["--model", "{gpt2}"], {}, "is a decoder-only model (gpt2): expected an encoder such as BERT, RoBERTa"),
    (["--model", "{bare}"], {}, "has no tokenizer and no weight files: expected tokenizer: tokenizer.json or vocab.txt"),
    (["--max-length", "100000"], {}, "--max-length 100000: longer than the 512 positions of --model 'default'; expected at most 512"),
    (["--model", "{tiny}", "--max-length", "129"], {}, "--max-length 129: longer than the 128 positions"),
    # data files
    (["--bio-data", "/nonexistent/bio.csv"], {}, "data file '/nonexistent/bio.csv' does not exist"),
    (["--bio-data", "{tmp}/dir.csv"], {"dir.csv/a.csv": b""}, "dir.csv' is a directory; expected a file"),
    (["--bio-data", "{tmp}/bio.txt"], {"bio.txt": b"a,b\n"}, "bio.txt' is not 'hpo', 'licenses', 'security', 'scripture', 'trade', 'patents', 'hf:<dataset>[@split]' or a file ending in"),
    (["--bio-data", "{tmp}/bio.csv"], {"bio.csv": b""}, "bio.csv' is empty; expected a header row"),
    (["--bio-data", "{tmp}/bio.csv"], {"bio.csv": b"text,label\n"}, "bio.csv' has a header (text, label) but no rows"),
    (["--bio-data", "{tmp}/bio.csv"], {"bio.csv": b"text,label\nthe caf\xe9,a\nthe tea,b\n"}, "bio.csv' is not UTF-8: byte 0xe9 on line 2"),
    (["--bio-data", "{tmp}/bio.csv"], {"bio.csv": b"text,label\na,x\nb,y,z\n"}, "bio.csv' line 3 has 3 fields, its header 2"),
    (["--bio-data", "{tmp}/bio.csv"], {"bio.csv": b'text,label\n"a\nb",x\n"c"d,y\n'}, "bio.csv' line 4 is not valid CSV (',' expected after"),
    (["--bio-data", "{tmp}/bio.csv"], {"bio.csv": b'text,label\n"a,x\nb,y\n'}, "bio.csv' line 2 opens a quote that is never closed"),
    (["--bio-data", "{tmp}/bio.csv"], {"bio.csv": b"sentence,category\nhello,a\nworld,b\n"}, "has no column 'text'; columns found: sentence, category"),
    (["--bio-data", "{tmp}/bio.jsonl"], {"bio.jsonl": b'{"text": "a", "label": "x"}\n{"text": "b", label: "y"}\n'}, "bio.jsonl' line 2 is not valid JSON"),
    (["--bio-data", "{tmp}/bio.jsonl"], {"bio.jsonl": b'{"text": "a", "label": "x"}\n\n[1, 2]\n'}, "bio.jsonl' line 3 holds a list; expected one JSON object per line"),
    (["--bio-data", "{tmp}/bio.json"], {"bio.json": b"42\n"}, "bio.json' holds a number (42); expected a list of records"),
    (["--bio-data", "{tmp}/bio.json"], {"bio.json": b'{"text": ["a", "b"], "label": ["x", "y"]}'}, "bio.json' holds one JSON object; expected a list of records"),
    (["--bio-data", "{tmp}/bio.json"], {"bio.json": b'[{"text": "a"}, "b"]'}, "bio.json' holds a list whose item 2 is a string"),
    (["--bio-data", "{tmp}/bio.json"], {"bio.json": b'[{"text": "a",]'}, "bio.json' is not valid JSON (Expecting property name"),
    (["--bio-data", "{bio}", "--legal-data", "{tmp}/legal.jsonl"], {"legal.jsonl": b'{"text": "a", "label": "x"}\n{"text": "b", "label": "x"}\n'},
     "legal.jsonl' has 1 label with 2 or more examples in column 'label'; expected at least 2"),
    (["--bio-data", "{tmp}/bio.csv"], {"bio.csv": b"text,label\na,x\nb,x\nc,y\nd,y\n"}, "bio.csv' leaves no test examples"),
    # the split and the sizes
    (["--bio-data", "{bio}", "--legal-data", "{legal}", "--group-column", "doc"], {}, "bio.csv' has no column 'doc'; columns found: text, label"),
    (["--bio-data", "{bio}", "--legal-data", "{legal}", "--train-size", "1"], {}, "--train-size 1: domain bio has 3 labels; expected at least 3"),
]


@pytest.fixture
def no_model_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to load weights or train fails the test: errors must come first."""

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("a model was loaded before the input was validated")

    monkeypatch.setattr("fl.modeling.model.AutoModel.from_pretrained", refuse)
    monkeypatch.setattr("fl.studies.experiment.run_experiment", refuse, raising=False)
    monkeypatch.setattr("fl.studies.many_domains.run_many_domains", refuse, raising=False)


@pytest.fixture(scope="module")
def config_only_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Folders with nothing but a tiny config.json: the kind of model is told from the config alone."""
    from transformers import GPT2Config, T5Config

    from tests.conftest import tiny_bert_config

    folders = {}
    configs = {
        "t5": T5Config(vocab_size=32, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2),
        "gpt2": GPT2Config(vocab_size=32, n_embd=8, n_layer=1, n_head=2),
        "bare": tiny_bert_config(),
    }
    for name, config in configs.items():
        folders[name] = tmp_path_factory.mktemp(name)
        config.save_pretrained(folders[name])
    return folders


@pytest.mark.parametrize(("argv", "files", "needle"), CASES, ids=[" ".join(argv) + f" {needle[:30]}" for argv, _, needle in CASES])
def test_bad_input_fails_with_one_line_and_exit_2(
    argv, files, needle, tmp_path, toy_csvs, tiny_model_dir, config_only_models, capsys, no_model_loading
) -> None:
    folder = tmp_path / "inputs"
    folder.mkdir()
    for name, content in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(content)
    paths = {"tmp": folder, "bio": toy_csvs[0], "legal": toy_csvs[1], "tiny": tiny_model_dir, **config_only_models}
    out = tmp_path / "out"

    code = bio_legal.main([arg.format(**paths) for arg in argv] + ["--out", str(out)])

    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err
    assert needle in err
    assert not out.exists()


MANY_DOMAINS_CASES = [  # sims/many_domains.py's own options, and the two-domain shorthand it has no use for
    (["--sizes", "1,6"], "--sizes '1,6': expected integers >= 2 separated by commas"),
    (["--sizes", "two"], "--sizes 'two': expected integers >= 2"),
    (["--federated", "-1"], "--federated -1: expected an integer >= 0"),
    (["--bio-data", "hpo"], "--bio-data / --legal-data: this study names its domains with --domain NAME=SOURCE"),
    (["--rules", "ties,bogus"], "bogus"),
    (["--domain", "bio=hpo"], "--domain bio=hpo: 1 domain given; expected at least two to merge"),
]


@pytest.mark.parametrize(("argv", "needle"), MANY_DOMAINS_CASES, ids=[" ".join(argv) for argv, _ in MANY_DOMAINS_CASES])
def test_many_domains_refuses_bad_input_in_one_line(argv: list[str], needle: str, tmp_path: Path, capsys, no_model_loading) -> None:
    from sims import many_domains

    out = tmp_path / "out"

    code = many_domains.main([*argv, "--out", str(out)])

    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: ") and needle in err
    assert not out.exists()


OUT_CASES = [  # (what --out is before the run, extra flags, a fragment of the message)
    ("a file", [], "is a file, expected a folder"),
    ("a finished run", [], "already holds results or a checkpoint: pass --resume to continue it or --overwrite"),
    ("an empty folder", ["--resume"], "holds no checkpoint to resume"),
    ("a finished run", ["--resume", "--seed", "3"], "--resume: the configuration differs from the run in"),
    ("a finished run", ["--resume", "--overwrite"], "--resume and --overwrite: expected one of them"),
]


@pytest.mark.parametrize(("before", "flags", "needle"), OUT_CASES, ids=[f"{b} {' '.join(f)}" for b, f, _ in OUT_CASES])
def test_an_out_that_would_lose_results_fails_with_one_line_and_changes_nothing(
    before: str, flags: list[str], needle: str, tmp_path, capsys, no_model_loading
) -> None:
    from fl.run.checkpoint import RunFolder, run_identity
    from fl.run.cli import build_config, rule_settings

    out = tmp_path / "out"
    if before == "a file":
        out.write_text("notes")
    elif before == "an empty folder":
        out.mkdir()
    else:
        args = bio_legal.parse_args(["--quick"])
        RunFolder(out, run_identity(build_config(args), rule_settings(args))).open()
        (out / "results.json").write_text("{}")
    snapshot = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} if out.is_dir() else out.read_bytes()

    code = bio_legal.main(["--quick", "--out", str(out), *flags])

    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: ") and needle in err
    assert snapshot == ({p: p.read_bytes() for p in out.rglob("*") if p.is_file()} if out.is_dir() else out.read_bytes())


def test_a_supernode_claiming_a_domain_the_run_does_not_have_is_refused_in_one_line() -> None:
    """The deployment's own bad input (a SuperNode's node config); tests/test_deployment.py runs it on real SuperNodes."""
    from fl.federation.client import client_role

    config = RunConfig(domain_data="bio=hpo; legal=licenses; finance=finance.csv")

    with pytest.raises(ConfigError) as error:
        client_role(config, {"domain": "law"})

    assert str(error.value) == "node domain 'law' is unknown: expected one of bio, legal, finance"


@pytest.mark.parametrize(
    ("flags", "needle"),
    [([], "is given more than once; expected each expert once"), (["--peft", "lora"], "--peft: merge_experts.py merges full model folders")],
)
def test_merge_experts_refuses_the_same_expert_twice_and_lora_options(tiny_model_dir: Path, tmp_path: Path, capsys, flags: list[str], needle: str) -> None:
    from sims import merge_experts

    code = merge_experts.main(["--experts", str(tiny_model_dir), f"{tiny_model_dir}/", "--out", str(tmp_path / "out"), *flags])

    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert needle in err


def test_a_node_changing_its_partition_in_a_streamed_round_is_refused_naming_the_node() -> None:
    """A streamed round (FedAvg) checks the claim before asking whether the round expected that client."""
    from flwr.app import MessageType

    from strategies.flower.streaming import InOrderMean
    from tests.test_flower_strategies import reply, strategy_with_global, toy_global

    strategy = strategy_with_global("fedavg", toy_global(), 2)
    strategy.policy.node_roles = {1: "bio-0", 2: "legal-0"}  # from the roll call
    strategy.stream = InOrderMean(["bio-0", "legal-0"], strategy.admit)
    moved = reply({"encoder.w": torch.ones(2)}, 5, "bio", 1)
    moved.content["client"]["partition-id"] = 5
    moved.metadata.message_type = MessageType.TRAIN

    with pytest.raises(UpdateError, match=r"^node 1: claims to be bio-5, but served bio-0 in an earlier reply: refused$"):
        strategy.on_reply(moved)


@pytest.mark.parametrize(
    ("script", "argv0", "expected"),
    [
        ("sims/many_domains.py", "sims/many_domains.py", "python sims/many_domains.py --quick --out runs/x --resume"),
        ("sims/many_domains.py", "fedmerge many-domains", "fedmerge many-domains --quick --out runs/x --resume"),
        ("sims/bio_legal.py", "fedmerge run", "fedmerge run --quick --out runs/x --resume"),
    ],
)
def test_the_printed_resume_command_is_the_one_the_user_typed(script: str, argv0: str, expected: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from fl.run.cli import resume_command_of

    monkeypatch.setattr("sys.argv", [argv0, "--quick", "--overwrite"])

    assert resume_command_of(script, ["--quick", "--overwrite"], "runs/x") == expected


DAMAGED = [  # (file under checkpoints/, what is done to it)
    ("run.json", "truncate"),
    ("run.json", "empty-object"),
    ("start.safetensors", "truncate"),
    ("baselines.json", "truncate"),
    ("fedavg/state.json", "truncate"),
    ("fedavg/state.json", "empty-object"),
    ("fedavg/round-1.safetensors", "truncate"),
]


@pytest.mark.parametrize(("name", "damage"), DAMAGED, ids=[f"{n} {d}" for n, d in DAMAGED])
def test_a_damaged_checkpoint_under_resume_fails_in_one_line_naming_the_file_and_changes_nothing(
    name: str, damage: str, tmp_path: Path, capsys, no_model_loading
) -> None:
    from fl.modeling.evaluation import Score
    from fl.run.checkpoint import RunFolder, run_identity
    from fl.run.cli import build_config, rule_settings

    out = tmp_path / "out"
    args = bio_legal.parse_args(["--quick", "--strategies", "fedavg"])
    folder = RunFolder(out, run_identity(build_config(args), rule_settings(args)))
    folder.open()
    score = {"bio": Score(0.5, 0.5, 1.0, np.array([True, False]))}
    folder.save_baselines({"base": score}, {"w": torch.ones(3)})
    folder.strategy("fedavg").save(1, {"w": torch.ones(3)}, {"history": []}, {0: score})
    path = out / "checkpoints" / name
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2] if damage == "truncate" else b"{}")
    snapshot = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    code = bio_legal.main(["--quick", "--strategies", "fedavg", "--out", str(out), "--resume"])

    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith(f"error: --resume: {path} is damaged (")
    assert "--overwrite" in err
    assert snapshot == {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}


@pytest.mark.parametrize(
    ("record", "needle"),
    [
        ({"reply-timeout": "inf"}, "--reply-timeout inf: expected a finite number of seconds > 0"),
        ({"seed": "-1"}, "--seed -1: expected an integer >= 0"),
        ({"lr": "nan"}, "--lr nan: expected a finite number > 0"),
    ],
)
def test_bad_run_config_values_are_refused(record: dict[str, str], needle: str) -> None:
    """The same checks on the Flower run config (`flwr run`), which has options the CLI lacks."""
    with pytest.raises(ConfigError) as error:
        RunConfig.from_record(record)

    assert str(error.value) == needle


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_a_device_this_machine_lacks_is_refused_by_the_config_and_by_flowers_run_config(tmp_path: Path) -> None:
    from fl.apps.server_app import app_options

    needle = "--device cuda: this machine has no CUDA device torch can use"
    out = tmp_path / "out"

    for refuse in [
        lambda: RunConfig(device="cuda").validate(),
        lambda: split_run_config({"device": "cuda", "rounds": 2}),
        lambda: app_options({"device": "cuda", "strategies": "fedavg", "out": str(out)}),
    ]:
        with pytest.raises(ConfigError) as error:
            refuse()
        assert str(error.value) == needle
    assert not out.exists()


def test_a_device_index_the_machine_lacks_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a machine with one GPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)

    accepted = RunConfig(device="cuda:0").validate()
    with pytest.raises(ConfigError) as error:
        RunConfig(device="cuda:3").validate()

    assert accepted.device == "cuda:0"
    assert str(error.value) == "--device cuda:3: this machine has 1 CUDA device(s) torch can use: expected an index 0..0"


def test_every_float_option_is_checked_for_finiteness() -> None:
    floats = [name for name, value in vars(RunConfig()).items() if isinstance(value, float)]

    for name in floats:
        with pytest.raises(ConfigError, match=f"{name.replace('_', '-')} inf"):
            RunConfig(**{name: math.inf}).validate()


def test_a_real_process_prints_one_line_and_exits_2(tmp_path: Path) -> None:
    out = tmp_path / "out"

    done = subprocess.run(
        [sys.executable, "sims/bio_legal.py", "--lr", "inf", "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300
    )

    assert done.returncode == 2
    assert done.stderr.strip() == "error: --lr inf: expected a finite number > 0"
    assert not out.exists()
