"""Bringing one's own experts: the compatibility report on four kinds of pairs, refusals as one line, exit codes,
the vocabulary remap through a whole merge, and a checkpoint's own classifier as its domain's head.

Every expert is a tiny BERT built here (no download): fine-tunes of one base are the base plus small noise."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, BertForSequenceClassification, BertModel, BertTokenizerFast

from fl.experts.compatibility import compatibility, moved_units
from fl.experts.loading import load_expert, save_predictor
from fl.experts.merge import merge, merged_predictor, prepare, refusal
from fl.modeling.folder import load_merged, save_merged
from fl.modeling.model import MultiHeadEncoder, default_model_path
from fl.modeling.train_settings import TrainSettings
from sims import merge_experts
from strategies.rules import settings
from tests.conftest import FINANCE_WORDS, tiny_bert_config, write_domain_csv

LABELS = {"bio": ["class-0", "class-1", "class-2"], "legal": ["class-0", "class-1", "class-2"]}
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"]


def save_expert(folder: Path, encoder: BertModel, tokenizer_from: Path | None = None, labels: dict[str, list[str]] = LABELS) -> Path:
    """A fedmerge expert folder (encoder, MiniLM tokenizer or the given one, a seeded head per domain)."""
    torch.manual_seed(7)
    model = MultiHeadEncoder(encoder, {d: len(v) for d, v in labels.items()})
    source = tokenizer_from or default_model_path()
    tokenizer = BertTokenizerFast.from_pretrained(source)
    save_merged(model, tokenizer, folder, labels)
    return folder


def encoder(seed: int, **config: object) -> BertModel:
    torch.manual_seed(seed)
    return AutoModel.from_config(tiny_bert_config(**config))


def fine_tune_of(base: BertModel, seed: int, scale: float = 0.02) -> BertModel:
    """The base plus small noise: what a short fine-tune does to the weights, at no training cost."""
    model = BertModel(base.config)
    generator = torch.Generator().manual_seed(seed)
    model.load_state_dict({k: v + scale * v.std() * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
                           for k, v in base.state_dict().items()})
    return model


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("experts")
    base = encoder(0)
    base_dir = root / "base"
    base.save_pretrained(base_dir)
    for name in TOKENIZER_FILES:
        shutil.copy(default_model_path() / name, base_dir / name)
    return {
        "base": base_dir,
        "bio": save_expert(root / "bio", fine_tune_of(base, 1)),
        "legal": save_expert(root / "legal", fine_tune_of(base, 2)),
        "independent": save_expert(root / "independent", encoder(5)),
        "wide": save_expert(root / "wide", encoder(6, hidden_size=48, intermediate_size=96)),
    }


def loaded(folders: dict[str, Path], *names: str) -> list:
    return [load_expert(str(folders[n]), (d,)) for n, d in zip(names, ["bio", "legal"])]


def test_fine_tunes_of_one_base_merge_and_weight_matching_moves_almost_nothing(folders) -> None:
    experts = loaded(folders, "bio", "legal")
    base = load_expert(str(folders["base"]), (), "base")

    report = compatibility(experts, base)
    inputs = prepare(experts, base, "first")
    moved, units = moved_units(inputs.states[0], inputs.states[1], 4, 0)

    assert report.blocker == "" and report.same_vocabulary and not report.config_differences
    assert all(d < 0.05 for d in report.base_distance.values())
    assert moved <= 0.02 * units


def test_independent_inits_of_one_config_merge_but_weight_matching_moves_most_units(folders) -> None:
    experts = loaded(folders, "bio", "independent")

    report = compatibility(experts, None)
    inputs = prepare(experts, None, "first")
    moved, units = moved_units(inputs.states[0], inputs.states[1], 4, 0)

    assert report.blocker == ""
    assert moved >= 0.5 * units


def test_different_widths_refuse_every_weight_merge_in_one_line_naming_the_sizes(folders) -> None:
    experts = loaded(folders, "bio", "wide")
    report = compatibility(experts, None)

    reasons = {s.name: refusal(s, report, experts, None) for s in settings(["fedavg", "ties", "aligned", "fedprox"], {})}

    assert report.blocker == "hidden size 32 vs 48"
    assert reasons["fedavg"] == "fedavg: weights cannot be averaged: hidden size 32 vs 48"
    assert reasons["ties"].startswith("ties: weights cannot be averaged")
    assert reasons["fedprox"].startswith("fedprox: acts during federated rounds")
    assert all("\n" not in r for r in reasons.values())


def test_task_vector_rules_need_a_base(folders) -> None:
    experts = loaded(folders, "bio", "legal")

    reason = refusal(settings(["ties"], {})[0], compatibility(experts, None), experts, None)

    assert reason == "ties: needs --base: its task vectors are differences from the experts' common base"


def word_tokenizer(folder: Path, words: list[str]) -> Path:
    folder.mkdir(parents=True)
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    BertTokenizerFast.from_pretrained(folder).save_pretrained(folder)
    return folder


def test_partly_shared_vocabularies_are_reported_and_a_token_only_one_expert_has_keeps_its_output(tmp_path: Path) -> None:
    first_words = ["the", "heart", "kidney", "liver", "##s"]
    second_words = ["the", "liver", "heart", "patent", "warranty", "##s"]  # heart/liver at other ids
    shared = encoder(3, vocab_size=len(first_words) + 5)
    state = shared.state_dict()
    second = BertModel(tiny_bert_config(vocab_size=len(second_words) + 5))
    second.load_state_dict({**state, "embeddings.word_embeddings.weight": torch.randn(len(second_words) + 5, 32)}, strict=True)
    with torch.no_grad():  # the special tokens' rows agree, so a sentence of "patent warranty" reads only expert 2's rows
        second.embeddings.word_embeddings.weight[:5] = shared.embeddings.word_embeddings.weight[:5]
    a = save_expert(tmp_path / "a", shared, word_tokenizer(tmp_path / "tok-a", first_words))
    b = save_expert(tmp_path / "b", second, word_tokenizer(tmp_path / "tok-b", second_words))
    experts = [load_expert(str(a), ("bio",)), load_expert(str(b), ("legal",))]

    report = compatibility(experts, None)
    inputs = prepare(experts, None, "union")
    state = merge(settings(["fedavg"], {})[0], inputs, experts, [{}, {}], TrainSettings(steps=1), 0)
    merged = merged_predictor("m", state, experts, inputs)
    text = "patent warranty"
    own = experts[1].body(**experts[1].tokenizer(text, return_tensors="pt")).last_hidden_state
    out = merged.body(**inputs.tokenizer(text, return_tensors="pt")).last_hidden_state

    vocabulary = report.vocabulary[0]
    assert (vocabulary.same_id, vocabulary.other_id, vocabulary.only_first, vocabulary.only_second) == (6, 3, 1, 2)
    assert "shared 75.00%" in "\n".join(report.lines())
    assert report.blocker == ""  # the vocabulary size differs, which the remap handles
    assert torch.allclose(out, own, atol=1e-6, rtol=0)


def test_a_sequence_classification_checkpoint_scores_with_its_own_classifier(tmp_path: Path) -> None:
    torch.manual_seed(4)
    checkpoint = BertForSequenceClassification(tiny_bert_config(num_labels=3))
    checkpoint.save_pretrained(tmp_path / "clf")
    for name in TOKENIZER_FILES:
        shutil.copy(default_model_path() / name, tmp_path / "clf" / name)
    checkpoint.eval()
    from fl.data.batches import encode

    expert = load_expert(str(tmp_path / "clf"), ("legal",))
    texts = ["the licence grants a patent", "copyleft applies to the source"]
    data = encode(expert.tokenizer, texts, [0, 1], 16)
    batch = expert.tokenizer(texts, padding=True, return_tensors="pt")

    assert expert.head_kind("legal") == "BertForSequenceClassification classifier"
    assert torch.allclose(expert.logits("legal", data), checkpoint(**batch).logits, atol=1e-5)
    saved = load_expert(str(save_predictor(expert, tmp_path / "saved", {"legal": ["a", "b", "c"]})), ("legal",))
    assert saved.head_kind("legal") == "BertForSequenceClassification classifier"  # read back as that domain's head
    assert torch.allclose(saved.logits("legal", data), checkpoint(**batch).logits, atol=1e-5)


def run(folders: dict[str, Path], toy_csvs, tmp_path: Path, *extra: str) -> int:
    bio, legal = toy_csvs
    argv = ["--bio-data", str(bio), "--legal-data", str(legal), "--train-size", "60", "--test-size", "24", "--max-length", "16",
            "--batch-size", "8", "--rounds", "1", "--local-steps", "2", "--out", str(tmp_path / "out"), *extra]
    return merge_experts.main(argv)


def test_cli_skips_refused_merges_and_exits_2_when_nothing_can_be_produced(folders, toy_csvs, tmp_path: Path, capsys) -> None:
    code = run(folders, toy_csvs, tmp_path, "--experts", str(folders["bio"]), str(folders["wide"]), "--rules", "fedavg,ties")

    captured = capsys.readouterr()
    assert code == 2
    assert "skipped fedavg: weights cannot be averaged: hidden size 32 vs 48" in captured.out
    assert captured.err.strip().startswith("error: nothing to produce") and len(captured.err.strip().splitlines()) == 1
    assert not (tmp_path / "out" / "results.json").exists()


def test_cli_distils_experts_of_different_widths_and_writes_the_headline_files(folders, toy_csvs, tmp_path: Path) -> None:
    code = run(folders, toy_csvs, tmp_path, "--experts", str(folders["bio"]), str(folders["wide"]), "--base", str(folders["base"]),
               "--distill", "--distill-steps", "20")

    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert code == 0
    assert set(results["skipped"]) == {"fedavg", "ties", "aligned"}
    assert set(results["compatibility"]["distance-to-base"]) == {"bio-expert"}  # the wide expert has none
    assert [row["model"] for row in results["table"]] == ["base", "bio-expert", "legal-expert", "ensemble", "distilled-base"]
    kl_before, kl_after = results["distillation"]["kl-before"], results["distillation"]["kl-after"]
    assert all(kl_after[d] < kl_before[d] for d in LABELS)
    assert (tmp_path / "out" / "scores.png").stat().st_size > 0
    assert AutoModel.from_pretrained(tmp_path / "out" / "distilled-base").config.hidden_size == 32


def test_cli_merges_fine_tunes_against_a_base(folders, toy_csvs, tmp_path: Path) -> None:
    code = run(folders, toy_csvs, tmp_path, "--experts", str(folders["bio"]), str(folders["legal"]), "--base", str(folders["base"]),
               "--rules", "fedavg,ties,aligned", "--distill", "--distill-steps", "2", "--student", str(folders["legal"]))

    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert code == 0 and results["skipped"] == {}
    assert [row["model"] for row in results["table"]] == [
        "base", "bio-expert", "legal-expert", "ensemble", "one-shot-average", "one-shot-ties", "one-shot-aligned",
        "distilled-legal-expert"]
    assert results["compatibility"]["moved-units"]["legal-expert"]["moved"] <= 0.02 * results["compatibility"]["moved-units"]["legal-expert"]["units"]


def test_cli_merges_three_experts_of_three_domains(folders, toy_csvs, tmp_path: Path) -> None:
    bio, legal = toy_csvs
    finance = write_domain_csv(tmp_path / "finance.csv", FINANCE_WORDS, 120, 2)
    labels = {**LABELS, "finance": LABELS["bio"]}
    base = BertModel.from_pretrained(folders["base"])
    experts = [save_expert(tmp_path / d, fine_tune_of(base, 10 + i), labels=labels) for i, d in enumerate(labels)]
    argv = ["--domain", f"bio={bio}", "--domain", f"legal={legal}", "--domain", f"finance={finance}", "--train-size", "60",
            "--test-size", "24", "--max-length", "16", "--batch-size", "8", "--rounds", "1", "--local-steps", "2",
            "--out", str(tmp_path / "out"), "--experts", *map(str, experts), "--base", str(folders["base"]), "--rules", "fedavg,ties,regmean"]

    code = merge_experts.main(argv)

    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert code == 0 and results["skipped"] == {}
    assert [row["model"] for row in results["table"]] == [
        "base", "bio-expert", "legal-expert", "finance-expert", "ensemble", "one-shot-average", "one-shot-ties", "one-shot-regmean"]
    assert all(set(row["per-domain"]) == {"bio", "legal", "finance"} for row in results["table"])
    model, saved_labels = load_merged(tmp_path / "out" / "one-shot-ties")
    assert set(model.heads) == set(saved_labels) == {"bio", "legal", "finance"}


@pytest.mark.parametrize(("extra", "needle"), [
    (["--experts", "{bio}"], "--experts {bio}: one expert; expected two or more"),
    (["--experts", "{bio}", "{legal}", "--attack", "scale:10:1"], "--attack: an option of federated rounds, which merge_experts.py does not run"),
    (["--experts", "{bio}", "{legal}", "--domains", "bio"], "--domains bio: 1 entries for 2 experts; expected one per expert"),
    (["--experts", "{bio}", "{legal}", "--domains", "bio,bio"], "--domains bio,bio: no expert serves legal"),
    (["--experts", "{bio}", "/nonexistent/expert"], "--experts '/nonexistent/expert' is not a model folder"),
    (["--experts", "{bio}", "{legal}", "--student", "teacher"], "--student teacher: expected auto, merge, base or one of --experts"),
    (["--experts", "{bio}", "{legal}", "--distill-data", "/nonexistent/texts.txt"], "unlabelled text file '/nonexistent/texts.txt' does not exist"),
])
def test_bad_input_fails_with_one_line_and_exit_2(folders, toy_csvs, tmp_path: Path, capsys, extra: list[str], needle: str) -> None:
    paths = {k: str(v) for k, v in folders.items()}

    code = run(folders, toy_csvs, tmp_path, *[a.format(**paths) for a in extra])

    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert needle.format(**paths) in err


def test_train_expert_writes_a_folder_merge_experts_reads(tiny_model_dir: Path, toy_csvs, tmp_path: Path) -> None:
    from sims import train_expert

    bio, legal = toy_csvs
    argv = ["--model", str(tiny_model_dir), "--bio-data", str(bio), "--legal-data", str(legal), "--train-size", "60",
            "--test-size", "24", "--max-length", "16", "--batch-size", "8", "--rounds", "1", "--local-steps", "2"]

    code = train_expert.main([*argv, "--expert", "legal", "--out", str(tmp_path / "legal")])
    expert = load_expert(str(tmp_path / "legal"), ("legal",))

    assert code == 0
    assert set(expert.heads) == {"bio", "legal"} and expert.config.hidden_size == 32
    assert train_expert.main([*argv, "--expert", "law", "--out", str(tmp_path / "law")]) == 2


def test_an_expert_whose_head_predicts_other_labels_is_refused_before_any_scoring(folders, toy_csvs, tmp_path: Path, capsys) -> None:
    model, _ = load_merged(folders["legal"])
    save_merged(model, BertTokenizerFast.from_pretrained(folders["legal"]), tmp_path / "other", {"bio": ["x", "y", "z"], "legal": ["x", "y", "z"]})

    code = run(folders, toy_csvs, tmp_path, "--experts", str(folders["bio"]), str(tmp_path / "other"))

    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "its bio head predicts x, y, z...; expected the bio data's labels in their order: class-0, class-1, class-2..." in err
