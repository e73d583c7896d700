"""The registry of merge rules: each is one pure function plus one declaration of its options.

A rule maps (global state, client updates, round context, option values) to the merged keys. Its declaration
says what its options are (``strategies.options.Option``), which of them go to the clients instead (FedProx's
mu, how many batches a statistic is computed over), which extra statistics clients must send, and what the
table of rules (docs/merge-rules.md) says about it. The CLI flags, the Flower run-config keys, validation and that table are all
made from this one registry; ``Rule.merge`` checks every client (weights and statistics) before the function
sees it, so the one-shot baselines, the Flower strategy and the tests merge with the same checked code.

The registry is declarations only: each function (a rule's merge, a statistic's check) is named by its module and
imported on its first call, so a command line builds its flags and ``--help`` without importing torch.

    python -m strategies.rules      # prints the table of rules of docs/merge-rules.md
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from strategies.options import Option, OptionError

if TYPE_CHECKING:
    import torch

    from strategies.update import Clients, MergeContext, State

OptionValue = float | int | bool


@dataclass(frozen=True)
class Deferred:
    """A function named ``module:name``, imported when first called (the merge math imports torch)."""

    path: str

    def resolve(self) -> Callable[..., Any]:
        module, _, name = self.path.partition(":")
        return getattr(importlib.import_module(module), name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.resolve()(*args, **kwargs)


@dataclass(frozen=True)
class Statistic:
    """Extra numbers a rule needs from every client besides its weights, computed on the client's own data.

    ``name`` is both the record a client sends them in and what the server asks for; ``check`` refuses a
    client's statistics (UpdateError naming the client) before anything is merged.
    """

    name: str
    describe: str  # for the table of rules: what is sent
    check: Callable[[State, State, str], None]  # (client state, its statistics, client name)


FISHER = Statistic("fisher", "diagonal Fisher of every trained weight (one model copy)", Deferred("strategies.fisher:check_fisher"))
GRAM = Statistic("gram", "Gram matrix of the inputs of every linear layer of the encoder (in x in each)", Deferred("strategies.regmean:check_grams"))


@dataclass(frozen=True)
class Rule:
    """A merge rule: its function and the declaration everything else is made from."""

    name: str
    function: Callable[..., dict[str, torch.Tensor]]  # (global state, clients, context, **options); a Deferred
    summary: str  # what the server does, one line
    paper: str
    memory: str  # the server's extra memory while merging
    use_when: str
    options: tuple[Option, ...] = ()
    client_options: Mapping[str, str] = field(default_factory=dict)  # option name -> train-config key sent to clients
    statistic: Statistic | None = None
    one_shot: bool = True  # whether merging two finished experts with it means something (FedProx's term is training-only)
    streams: bool = False  # a weighted mean of the states: merged one reply at a time as replies arrive (strategies.flower.streaming)
    deltas: bool = False  # merges differences from the global state: a one-shot merge needs the experts' common base
    server_text: bool = False  # learns from unlabelled text the server holds (MergeContext.server_text): refused without it
    adapters: str = "products"  # how it merges LoRA adapters (strategies.lora): "factors", "frozen-a", "products", "" = it cannot
    adapters_only: bool = False  # a rule for LoRA adapters alone (ffa, lora-exact): refused without them

    def key(self, option: Option) -> str:
        return f"{self.name}-{option.name}"

    def merge(
        self, global_state: State, clients: Clients, context: MergeContext, values: Mapping[str, OptionValue]
    ) -> dict[str, torch.Tensor]:
        """The merged keys (only those some client sent), after every client passed its checks."""
        from strategies.aggregation import UpdateError

        if not clients:
            raise UpdateError(f"{self.name}: no client updates to merge")
        for client in clients:
            check_client(global_state, client.state, client.weight, client.name)
            if self.statistic is not None:
                if not client.statistics:
                    raise UpdateError(f"{client.name}: sent no '{self.statistic.name}' statistics, which {self.name} needs")
                self.statistic.check(client.state, client.statistics, client.name)
        arguments = {o.parameter: values[o.name] for o in self.options if o.name not in self.client_options}
        from strategies.lora import has_adapters

        if self.adapters != "factors" and has_adapters(global_state):
            return self.merge_adapters(global_state, clients, context, arguments)
        return self.function(global_state, clients, context, **arguments)

    def merge_adapters(self, global_state: State, clients: Clients, context: MergeContext, arguments: Mapping[str, object]) -> dict[str, torch.Tensor]:
        """A merge of LoRA adapters the way this rule declares (strategies.lora)."""
        from strategies.aggregation import UpdateError
        from strategies.lora import check_frozen_a, merge_products

        if self.adapters == "products":
            return merge_products(self.function, global_state, clients, context, arguments)
        if self.adapters == "frozen-a":
            check_frozen_a(clients)
            return self.function(global_state, clients, context, **arguments)
        raise UpdateError(f"{self.name} cannot merge LoRA adapters: {ADAPTER_REFUSALS.get(self.name, 'it merges full weights')}")

    def client_config(self, values: Mapping[str, OptionValue]) -> dict[str, OptionValue | str]:
        """What clients must know to train for this rule: its client-side options and the statistic to send."""
        config: dict[str, OptionValue | str] = {key: values[name] for name, key in self.client_options.items()}
        if self.statistic is not None:
            config["statistic"] = self.statistic.name
        if self.adapters == "frozen-a":
            config["freeze-lora-a"] = True
        return config


def check_adapters(strategies: Sequence[RuleSetting], peft: str) -> None:
    """Refuse, before any work, a rule that cannot merge LoRA adapters under ``--peft lora``, and an adapter-only
    rule without it."""
    for setting in strategies:
        rule = setting.rule
        if peft != "none" and not rule.adapters:
            usable = ", ".join(r.name for r in RULES.values() if r.adapters)
            raise OptionError(f"strategy '{setting.name}' cannot merge LoRA adapters ({ADAPTER_REFUSALS[rule.name]}): with --peft {peft} expected one of {usable}")
        if peft == "none" and rule.adapters_only:
            raise OptionError(f"strategy '{setting.name}' merges LoRA adapters: expected --peft lora, or another rule")


def check_server_text(strategies: Sequence[RuleSetting], server_data: bool) -> None:
    """Refuse, before any work, a rule that learns from server text when the server holds none."""
    needing = [s.name for s in strategies if s.rule.server_text]
    if needing and not server_data:
        raise OptionError(
            f"{needing[0]} learns its merge from unlabelled text at the server, and with server-data = false the server holds none: "
            "expected server-data = true or another rule"
        )


def check_client(global_state: State, state: State, weight: float, name: str) -> None:
    from strategies.aggregation import UpdateError, check_update

    check_update(global_state, state, name)
    if not (math.isfinite(weight) and weight > 0):
        raise UpdateError(f"{name}: averaging weight {weight:g}: expected a number > 0")


LAMBDA = Option("lambda", float, 1.0, "scale of the merged delta added to the global model (1: no extrapolation)", 0.0, 10.0, low_open=True)
DROP = Option("drop", float, 0.9, "probability of dropping each delta coordinate (survivors scaled by 1/(1-drop))", 0.0, 1.0, high_open=True)
BATCHES = Option("batches", int, 4, "training batches each client computes its statistic over, every round", 1, 10_000)

ADAPTER_REFUSALS = {  # why a rule with adapters="" cannot merge LoRA adapters
    "aligned": "it permutes the hidden units of full weights, which adapters on a frozen base cannot follow",
    "fisher": "its Fisher is of the full weights",
    "regmean": "its Gram matrices solve for full linear layers",
    "adamerging": "it learns coefficients over full-weight deltas at the server",
}

RULES: Mapping[str, Rule] = {
    rule.name: rule
    for rule in [
        Rule(
            "fedavg", Deferred("strategies.averaging:average"), "weighted mean of the clients' weights, key by key", "McMahan et al. 2017",
            "1 model copy (float32 sums)", "the reference; clients fine-tuned from one shared start",
            streams=True,
            adapters="factors",
        ),
        Rule(
            "fedprox", Deferred("strategies.averaging:average"), "FedAvg's merge; clients add mu/2 x their squared distance to the global weights to their loss", "Li et al. 2020",
            "1 model copy", "clients drift apart (many local steps, non-IID data)",
            options=(Option("mu", float, 0.01, "weight of the clients' proximal term", 0.0, 1e4),),
            client_options={"mu": "proximal-mu"},
            one_shot=False,
            streams=True,
            adapters="factors",
        ),
        Rule(
            "ffa", Deferred("strategies.averaging:average"), "FedAvg of the LoRA B factors; every client keeps A frozen at the shared seeded start (exact mean update)",
            "Sun et al. 2024 (FFA-LoRA)", "1 adapter copy", "LoRA clients: the exact mean update at half the adapter bytes, with half the trainable weights",
            adapters="frozen-a",
            adapters_only=True,
            one_shot=False,  # experts train A as well: there is no frozen A to merge them over
        ),
        Rule(
            "lora-exact", Deferred("strategies.averaging:average"), "weighted mean of the LoRA updates scale x B A per module, re-factored to the adapter rank by truncated SVD",
            "Bai et al. 2024 (FlexLoRA)", "1 dense update per adapted module; one SVD each",
            "LoRA clients that train both factors: the mean of the updates, not of the factors",
            adapters_only=True,
        ),
        Rule(
            "aligned", Deferred("strategies.permutation:aligned"), "weight-match each client to the global model (heads, FFN units), then FedAvg",
            "Ainsworth et al. 2023 (Git Re-Basin)", "1 model copy + one aligned client at a time",
            "clients that did not start from one shared model (independent runs, --init permuted)",
            options=(Option("residual", bool, True, "also permute the residual stream (embeddings, LayerNorms, heads)"),),
            adapters="",
        ),
        Rule(
            "task-arithmetic", Deferred("strategies.task_vectors:task_arithmetic"), "global + lambda x weighted mean of the deltas (lambda 1 = FedAvg)",
            "Ilharco et al. 2023", "1 model copy", "a server step size: lambda > 1 extrapolates the clients' common direction",
            options=(LAMBDA,),
            deltas=True,
        ),
        Rule(
            "ties", Deferred("strategies.task_vectors:ties"), "trim each delta to its top-density magnitudes, elect signs by mass, disjoint mean, x lambda",
            "Yadav et al. 2023", "1 model copy + one tensor's magnitudes; every reply held (read twice: thresholds, then merged block by block)",
            "deltas that interfere (coordinates where clients pull in opposite directions)",
            options=(Option("density", float, 0.2, "fraction of each delta tensor's entries kept (largest magnitudes)", 0.0, 1.0, low_open=True), LAMBDA),
            deltas=True,
        ),
        Rule(
            "dare", Deferred("strategies.task_vectors:dare"), "drop delta coordinates at random (rescaled), weighted mean, x lambda", "Yu et al. 2024",
            "1 model copy", "large, redundant deltas; a random sparsification of what is merged",
            options=(DROP, LAMBDA),
            deltas=True,
        ),
        Rule(
            "dare-ties", Deferred("strategies.task_vectors:dare_ties"), "DARE's random drop in place of TIES' trim, then sign election and disjoint mean",
            "Yu et al. 2024", "1 model copy; every reply held (read once, block by block)", "as TIES, with a random sparsification",
            options=(DROP, LAMBDA),
            deltas=True,
        ),
        Rule(
            "breadcrumbs", Deferred("strategies.stock:breadcrumbs"),
            "drop each delta's largest (outliers) and smallest magnitudes, keeping the density below the outliers; weighted mean, x lambda",
            "Davari & Belilovsky 2024", "1 model copy", "a few large changes of one domain that hurt the others",
            options=(
                Option("density", float, 0.9, "fraction of each delta tensor's entries kept, below the outliers", 0.0, 1.0, low_open=True),
                Option("outliers", float, 0.01, "fraction of each delta tensor's largest magnitudes dropped", 0.0, 1.0, high_open=True),
                LAMBDA,
            ),
            deltas=True,
        ),
        Rule(
            "model-stock", Deferred("strategies.stock:model_stock"),
            "per key global + t x (weighted mean - global), t = N cos / (1 + (N - 1) cos) from the deltas' mean pairwise cosine",
            "Jang et al. 2024", "2 model copies", "clients fine-tuned on similar data: t keeps only the part of the mean the deltas agree on",
            deltas=True,
        ),
        Rule(
            "tsv", Deferred("strategies.subspace:tsv"),
            "per weight matrix each delta's top singular vectors (share x rank / N each), decorrelated across clients, summed; x lambda",
            "Gargiulo et al. 2025 (TSV-Merge)", "every reply held; one SVD per matrix and client",
            "many domains whose deltas share directions (the rest as task arithmetic)",
            options=(Option("share", float, 1.0, "share of each weight matrix's rank split among the clients", 0.0, 1.0, low_open=True), LAMBDA),
            deltas=True,
        ),
        Rule(
            "iso-c", Deferred("strategies.subspace:iso_c"),
            "per weight matrix the sum of the deltas with its singular values set to their mean (isotropic); x lambda",
            "Marczak et al. 2025", "every reply held; one SVD per matrix", "many domains: no direction, and no domain, dominates the merged update",
            options=(LAMBDA,),
            deltas=True,
        ),
        Rule(
            "iso-cts", Deferred("strategies.subspace:iso_cts"),
            "Iso-C on the summed delta's top common share of directions plus each client's own directions outside them",
            "Marczak et al. 2025", "every reply held; one SVD per matrix and client", "as Iso-C, with domains whose own directions the sum would drown",
            options=(Option("common", float, 0.8, "share of each weight matrix's rank taken from the summed delta (the rest: each client's own)", 0.0, 1.0, low_open=True), LAMBDA),
            deltas=True,
        ),
        Rule(
            "adamerging", Deferred("strategies.adamerging:adamerging"),
            "global + a coefficient per client and layer x its delta, learnt by minimising the prediction entropy on unlabelled server text",
            "Yang et al. 2024", "every reply held + one model's activations and gradients", "many domains, when the server holds unlabelled text of each",
            options=(
                Option("steps", int, 10, "Adam steps over the coefficients, one batch of each domain's text per step", 1, 10_000),
                Option("lr", float, 0.01, "Adam learning rate of the coefficients", 0.0, 1.0, low_open=True),
                Option("init", float, 0.0, "starting value of every coefficient; 0 = 1/N, the average (the paper: 0.3)", 0.0, 2.0),
            ),
            deltas=True,
            server_text=True,
            adapters="",
        ),
        Rule(
            "fisher", Deferred("strategies.fisher:fisher_average"), "per coordinate sum w F theta / sum w F, F each client's diagonal Fisher",
            "Matena & Raffel 2022", "2 model copies", "clients whose weights matter for their data in different places",
            options=(BATCHES, Option("floor", float, 1e-6, "lower bound of every Fisher value (no information -> FedAvg)", 0.0, 1.0, low_open=True)),
            client_options={"batches": "statistic-batches"},
            statistic=FISHER,
            adapters="",
        ),
        Rule(
            "regmean", Deferred("strategies.regmean:regmean"), "per linear layer the least-squares merge (sum w G)^-1 sum w G W, the rest FedAvg",
            "Jin et al. 2023", "1 model copy + the summed Grams", "linear layers whose inputs differ between domains",
            options=(BATCHES, Option("alpha", float, 0.9, "scale of each Gram's off-diagonal entries (1: exact least squares)", 0.0, 1.0)),
            client_options={"batches": "statistic-batches"},
            statistic=GRAM,
            adapters="",
        ),
        Rule(
            "median", Deferred("strategies.robust:median"), "coordinate-wise median of the clients' values, key by key (unweighted)",
            "Yin et al. 2018", "1 model copy + n x 1M-coordinate blocks; every reply held",
            "5+ clients, some of which may send corrupted or malicious weights",
            one_shot=False,
        ),
        Rule(
            "trimmed-mean", Deferred("strategies.robust:trimmed_mean"), "per coordinate drop the floor(beta n) smallest and largest values, mean of the rest (unweighted)",
            "Yin et al. 2018", "1 model copy + n x 1M-coordinate blocks; every reply held",
            "5+ clients, at most beta n of each key's senders faulty; closer to FedAvg than the median",
            options=(Option("beta", float, 0.2, "fraction of each key's senders dropped at each end, per coordinate", 0.0, 0.5, high_open=True),),
            one_shot=False,
        ),
        Rule(
            "clip", Deferred("strategies.robust:clip"), "scale each client's delta to L2 norm <= bound, then weighted mean of the deltas",
            "Sun et al. 2019", "1 model copy; every reply read twice (norms, then sums)",
            "5+ clients, a few of which may send oversized updates (boosted backdoors, diverged training)",
            options=(Option("bound", float, 0.0, "largest L2 norm of a client's delta (0: the round's median delta norm)", 0.0),),
            one_shot=False,
        ),
        Rule(
            "krum", Deferred("strategies.robust:krum"), "weighted mean of the n - f clients closest to their n - f - 2 nearest others (multi-Krum)",
            "Blanchard et al. 2017; El Mhamdi et al. 2018", "1 model copy + n x n distances; every reply read twice",
            "5+ similar clients (n >= 2f + 3), up to f of them arbitrary (Byzantine)",
            options=(Option("f", int, 1, "assumed number of attackers among the clients", 0),),
            one_shot=False,
        ),
    ]
}


@dataclass(frozen=True)
class RuleSetting:
    """A rule with the values of its options: what one strategy of a run merges with. ``name`` is the rule's
    name, or for a variant given inline (``ties:density=0.1``) that text: the strategy's row and folder."""

    rule: Rule
    values: Mapping[str, OptionValue]
    name: str

    def merge(self, global_state: State, clients: Clients, context: MergeContext) -> dict[str, torch.Tensor]:
        return self.rule.merge(global_state, clients, context, self.values)

    def client_config(self) -> dict[str, OptionValue | str]:
        return self.rule.client_config(self.values)

    def record(self) -> dict[str, OptionValue]:
        """The values under their keys (``ties-density``), for results.json."""
        return {self.rule.key(o): self.values[o.name] for o in self.rule.options}


def option_keys() -> dict[str, tuple[Rule, Option]]:
    """Every option of every rule by its key (flag and run-config key)."""
    return {rule.key(option): (rule, option) for rule in RULES.values() for option in rule.options}


def default_values() -> dict[str, OptionValue]:
    return {key: option.default for key, (_, option) in option_keys().items()}


def parse_names(text: str) -> list[str]:
    """Comma-separated strategies, each a rule name, or a variant with options inline (``ties:density=0.1:lambda=2``,
    for several settings of one rule in one run); every rule and option name known, each entry listed once."""
    entries = [entry.strip() for entry in text.split(",") if entry.strip()]
    if not entries:
        raise OptionError(f"strategies '{text}': none given; expected some of {', '.join(RULES)}")
    for entry in entries:
        inline_values(entry)
    repeated = sorted({entry for entry in entries if entries.count(entry) > 1})
    if repeated:
        raise OptionError(f"strategies '{text}': {', '.join(repeated)} listed more than once")
    return entries


def inline_values(entry: str) -> tuple[Rule, dict[str, str]]:
    """The rule of one strategy entry and its inline option values (raw text, by option name)."""
    name, *assignments = entry.split(":")
    if name not in RULES:
        raise OptionError(f"strategy '{entry}': unknown {name}; expected one of {', '.join(RULES)}")
    rule = RULES[name]
    names = [o.name for o in rule.options]
    values = {}
    for assignment in assignments:
        option, equals, value = assignment.partition("=")
        if option not in names or not equals:
            raise OptionError(f"strategy '{entry}': '{assignment}' is not OPTION=VALUE for an option of {name} ({', '.join(names) or 'none'})")
        values[option] = value
    return rule, values


def settings(entries: Sequence[str], values: Mapping[str, object]) -> list[RuleSetting]:
    """The strategies with their option values: inline values first, then ``values`` (by key, e.g. from flags),
    then the defaults. Every given value is checked, also those of rules not selected: a bad value is a mistake
    wherever it is."""
    keys = option_keys()
    unknown = [key for key in values if key not in keys]
    if unknown:
        raise OptionError(f"unknown rule option '{unknown[0]}': expected one of {', '.join(keys)}")
    parsed = {key: keys[key][1].parse(key, value) for key, value in values.items()}
    chosen = []
    for entry in entries:
        rule, inline = inline_values(entry)
        own = {o.name: parsed.get(rule.key(o), o.default) for o in rule.options}
        own.update({o.name: o.parse(f"{entry}: {o.name}", inline[o.name]) for o in rule.options if o.name in inline})
        chosen.append(RuleSetting(rule, own, entry))
    return chosen


def markdown_table() -> str:
    """The table of rules of docs/merge-rules.md, made from the registry."""
    lines = [
        "| rule | what the server does | options (default; range) | clients send | server memory | when to use | LoRA adapters (`--peft lora`) |",
        "|---|---|---|---|---|---|---|",
    ]
    for rule in RULES.values():
        options = "<br>".join(
            f"`{rule.key(o)}` {o.default} ({o.range_text}): {o.help}" + (" [client side]" if o.name in rule.client_options else "")
            for o in rule.options
        )
        sends = "weights" + (f" + {rule.statistic.describe}" if rule.statistic else "") + (" (the server needs unlabelled text)" if rule.server_text else "")
        lines.append(f"| `{rule.name}` ({rule.paper}) | {rule.summary} | {options or '-'} | {sends} | {rule.memory} | {rule.use_when} | {adapter_text(rule)} |")
    return "\n".join(lines) + "\n"


def adapter_text(rule: Rule) -> str:
    """What the table of rules says a rule does with LoRA adapters."""
    only = " (adapters only)" if rule.adapters_only else ""
    return {
        "factors": "A and B merged separately (FedIT: not the mean update)",
        "frozen-a": "B only, A frozen" + only,
        "products": "on each module's update scale x B A, re-factored to the rank by SVD" + only,
    }.get(rule.adapters) or f"refused: {ADAPTER_REFUSALS[rule.name]}"


if __name__ == "__main__":
    print(markdown_table(), end="")
