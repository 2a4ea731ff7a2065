"""Caption perturbation: every edit changes meaning (never the input, never synonyms only), grammar helpers
(articles, plurals, case), determinism under a seed, the vocabulary restriction, bad rows counted, the JSONL the
trainers read, the CLI and the LLM perturber's plumbing."""

from __future__ import annotations

import io
import json
import random
import re

import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from diffalign.cli import app
from diffalign.config import ConfigError
from diffalign.data import CaptionedImages
from diffalign.perturb import (
    CATEGORIES,
    KINDS,
    LLMPerturber,
    RulePerturber,
    build_perturber,
    changes_meaning,
    content_words,
    perturb_dataset,
    plural,
)
from diffalign.perturb.lexicon import STOPWORDS
from diffalign.perturb.llm import parse_answer
from diffalign.toyworld import VOCABULARY, prompts

CAPTIONS = [
    "a red circle on a blue background",
    "A cat sitting on a wooden table next to two apples",
    "an astronaut riding a horse on the moon at night",
    "Three dogs playing in the snow in winter",
    "a photo of a small glass of orange juice",
    "an old man reading a book in a library",
    "a cup of coffee to the left of a laptop",
    "Pixel art of a castle above the clouds",
    "2 cats and a fish under an umbrella",
    "a watercolor painting of a lighthouse on a rainy evening",
    "a giant robot standing behind a tiny house",
    "five yellow balloons floating over a city at sunset",
    "a woman holding an umbrella in the rain",
    "a black and white photo of a train crossing a bridge",
    "a metal chair and a glass vase inside a kitchen",
]


def _lexicon_class(word: str) -> tuple[str, int] | None:
    for cat in CATEGORIES:
        for ci, cls in enumerate(cat.classes):
            forms = {f for w in cls for f in ((w, plural(w)) if cat.nouns else (w,))}
            if word in forms:
                return cat.name, ci
    return None


# ---- lexicon ------------------------------------------------------------------------------------------------------
def test_lexicon_words_are_unambiguous_content_words():
    seen: dict[str, str] = {}
    for cat in CATEGORIES:
        assert cat.kind in KINDS and len(cat.classes) >= 2, cat.name
        for cls in cat.classes:
            for word in cls:
                for form in {word, plural(word)} if cat.nouns else {word}:
                    assert seen.setdefault(form, cat.name) == cat.name, f"{form!r} in {seen[form]} and {cat.name}"
                    assert not set(form.split()) <= STOPWORDS, form
    assert {c.kind for c in CATEGORIES} == set(KINDS) - {"count"}


def test_plural_and_content_words():
    assert [plural(w) for w in ("cat", "bus", "cherry", "mouse", "teddy bear", "knife", "fish", "tomato", "day")] == [
        "cats",
        "buses",
        "cherries",
        "mice",
        "teddy bears",
        "knives",
        "fish",
        "tomatoes",
        "days",
    ]
    assert content_words("A cat on the mat, with 2 dogs") == ["cat", "mat", "2", "dogs"]
    assert not changes_meaning("a red cat", "A  red cat")  # case and spacing only
    assert not changes_meaning("a red cat", "the red cat")  # function words only
    assert changes_meaning("a red cat and a blue dog", "a blue cat and a red dog")  # a swap moves content words


# ---- the rule perturber -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("caption", CAPTIONS)
def test_every_option_changes_meaning_and_never_uses_a_synonym(caption):
    perturber = RulePerturber()
    sites = perturber.candidates(caption)
    assert sites, f"no edit for {caption!r}"
    from diffalign.perturb.rules import apply_changes

    for kind, kind_sites in sites.items():
        for site in kind_sites:
            for edit in site:
                edited = apply_changes(caption, edit.changes)
                assert changes_meaning(caption, edited), (caption, edited)
                if kind in ("object", "attribute", "spatial", "context") and " -> " in edit.description:
                    old, new = edit.description.rsplit(": ", 1)[1].split(" -> ")
                    assert _lexicon_class(old.lower()) != _lexicon_class(new.lower()), edit.description


def test_draws_change_content_words_and_are_deterministic():
    perturber = RulePerturber()
    kinds = set()
    for row, caption in enumerate(CAPTIONS):
        a = perturber.perturb_many(caption, 3, seed=7, key=row)
        assert a == perturber.perturb_many(caption, 3, seed=7, key=row)  # same seed, same draw
        assert len({p.mismatched_caption for p in a}) == len(a) == 3
        for p in a:
            assert p.caption == caption and p.mismatched_caption != caption
            assert content_words(p.mismatched_caption) != content_words(caption)
            kinds.add(p.kind)
    assert kinds == set(KINDS)
    draws = [tuple(p.mismatched_caption for p in perturber.perturb_many(c, 3, 8, r)) for r, c in enumerate(CAPTIONS)]
    seed7 = [tuple(p.mismatched_caption for p in perturber.perturb_many(c, 3, 7, r)) for r, c in enumerate(CAPTIONS)]
    assert draws != seed7  # another seed, another draw


def test_grammar_articles_plurals_case_and_counts():
    perturber = RulePerturber(kinds=["object"])
    outputs = {p.mismatched_caption for p in _all_options(perturber, "An apple on a table")}
    assert "A banana on a table" in outputs and "An egg on a table" in outputs and "An apple on a desk" not in outputs
    for text in outputs:
        for article, word in re.findall(r"\b(an?|An?) (\w+)", text):
            assert (article.lower() == "an") == (word[0] in "aeiou"), text
    plurals = {p.mismatched_caption for p in _all_options(perturber, "two cats")}
    assert "two dogs" in plurals and "two mice" in plurals and "two mouse" not in plurals
    counts = {p.mismatched_caption for p in _all_options(RulePerturber(kinds=["count"]), "a big cat and 3 dogs")}
    assert {"two big cats and 3 dogs", "a big cat and 7 dogs", "a big cat and one dog"} <= counts
    assert "a big cat and 3 dogs" not in counts
    attributes = RulePerturber(kinds=["attribute"])
    swaps = {p.mismatched_caption for p in _all_options(attributes, "a red cat and a blue dog")}
    assert "a blue cat and a red dog" in swaps


def _all_options(perturber, caption):
    from diffalign.perturb.base import Perturbation
    from diffalign.perturb.rules import apply_changes

    sites = perturber.candidates(caption)
    return [
        Perturbation(caption, apply_changes(caption, e.changes), e.kind, e.description)
        for kind_sites in sites.values()
        for site in kind_sites
        for e in site
    ]


def test_toy_vocabulary_keeps_captions_in_the_toy_world():
    perturber = RulePerturber(vocabulary=VOCABULARY)
    for row, caption in enumerate(prompts("train")[:40]):
        for p in perturber.perturb_many(caption, 4, 0, row):
            assert set(p.mismatched_caption.split()) <= set(VOCABULARY), p.mismatched_caption
            assert p.kind in ("object", "attribute")
    options = {p.mismatched_caption for p in _all_options(perturber, "a red circle on a blue background")}
    assert "a blue circle on a red background" in options  # the binding swap
    assert "a red square on a blue background" in options and len(options) == 2 + 8 + 8 + 1


def test_nothing_to_edit_and_kind_errors():
    assert RulePerturber().perturb_many("hello world", 2, 0, 0) == []
    assert RulePerturber(kinds=["count"]).perturb_many("a red cat", 1, 0, 0)[0].kind == "count"
    with pytest.raises(ValueError, match=r"`kinds` must be among .*, got \['colour'\]"):
        RulePerturber(kinds=["colour"])
    with pytest.raises(ConfigError, match="`kinds` must be among"):
        build_perturber(kinds="object,colour")


# ---- datasets -----------------------------------------------------------------------------------------------------
def _png(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def imagefolder(tmp_path):
    root = tmp_path / "folder"
    root.mkdir()
    rows = [
        ("a red circle on a blue background", (200, 0, 0)),
        ("two cats on a sofa", (0, 200, 0)),
        ("", (0, 0, 200)),  # bad caption
        ("hello world", (9, 9, 9)),  # nothing to edit
        ("a green square", None),  # undecodable image
    ]
    lines = []
    for i, (caption, colour) in enumerate(rows):
        (root / f"{i}.png").write_bytes(_png(colour) if colour else b"not an image")
        lines.append(json.dumps({"file_name": f"{i}.png", "caption": caption}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_perturb_imagefolder_counts_bad_rows_and_feeds_the_trainers_dataset(imagefolder, tmp_path):
    out = tmp_path / "out" / "tpo.jsonl"
    stats = perturb_dataset(imagefolder, out, seed=3, per_caption=2)
    assert {k: stats[k] for k in ("rows", "kept_rows", "written", "bad_caption", "no_edit", "bad_image")} == {
        "rows": 5,
        "kept_rows": 2,
        "written": 4,
        "bad_caption": 1,
        "no_edit": 1,
        "bad_image": 1,
    }
    assert json.loads((tmp_path / "out" / "tpo.stats.json").read_text())["written"] == 4
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert {x["source_row"] for x in lines} == {0, 1}
    assert all(x["mismatched_caption"] != x["caption"] for x in lines)
    dataset = CaptionedImages(out, resolution=16, extra_columns=("mismatched_caption",))
    assert len(dataset) == 4
    item = dataset[0]
    assert item["pixels"].shape == (3, 16, 16) and item["pixels"][0].mean() > 0.5  # the red image
    assert item["caption"] == lines[0]["caption"] and item["mismatched_caption"] == lines[0]["mismatched_caption"]
    again = tmp_path / "again" / "tpo.jsonl"
    perturb_dataset(imagefolder, again, seed=3, per_caption=2)
    assert again.read_text() == out.read_text()  # deterministic under a seed


def test_perturb_parquet_with_image_bytes_writes_files_next_to_the_jsonl(tmp_path):
    source = tmp_path / "pairs.parquet"
    pd.DataFrame({"caption": ["a red cat", "a blue dog"], "jpg_0": [_png((200, 0, 0)), _png((0, 0, 200))]}).to_parquet(
        source
    )
    out = tmp_path / "data" / "tpo.jsonl"
    stats = perturb_dataset(source, out, image_column="jpg_0")
    assert stats["written"] == 2
    refs = [json.loads(x)["image"] for x in out.read_text().splitlines()]
    assert refs == ["tpo_images/00000000.png", "tpo_images/00000001.png"]
    assert CaptionedImages(out, resolution=16, extra_columns=("mismatched_caption",))[1]["pixels"][2].mean() > 0.5


def test_perturb_cli(imagefolder, tmp_path):
    out = tmp_path / "cli.jsonl"
    result = CliRunner().invoke(app, ["perturb", "--data", str(imagefolder), "--out", str(out), "--per-caption", "2"])
    assert result.exit_code == 0, result.output
    assert "4 lines from 2/5 rows (bad_caption 1, bad_image 1, no_edit 1, short 0)" in result.output
    result = CliRunner().invoke(app, ["perturb", "--data", str(imagefolder), "--out", str(out), "--kinds", "nope"])
    assert result.exit_code != 0 and "`kinds` must be among" in str(result.exception)


# ---- the LLM perturber --------------------------------------------------------------------------------------------
def test_llm_perturber_parses_checks_and_is_seeded():
    calls = []

    def fake(prompt: str, seed: int) -> str:
        calls.append(seed)
        caption = prompt.rsplit("Caption: ", 1)[1].split("\n")[0]
        if seed % 3 == 0:
            return caption  # unchanged: rejected
        return f'New caption: "{caption.replace("red", random.Random(seed).choice(["blue", "green"]))}"\nmore'

    perturber = LLMPerturber(generate_fn=fake)
    assert "Caption: a red cat" in perturber.prompt("a red cat", "attribute")
    results = perturber.perturb_many("a red cat", 2, seed=0, key=5)
    assert {r.mismatched_caption for r in results} == {"a blue cat", "a green cat"}
    assert all(r.kind.startswith("llm:") for r in results)
    first = list(calls)
    calls.clear()
    perturber.perturb_many("a red cat", 2, seed=0, key=5)
    assert calls == first  # the same seeds in the same order
    assert LLMPerturber(generate_fn=lambda p, s: "a red cat").perturb_many("a red cat", 1, 0, 0) == []
    assert parse_answer("\n  Output: `a dog`  \n") == "a dog"
    with pytest.raises(ValueError, match="`kinds` for the LLM perturber must be among"):
        LLMPerturber(generate_fn=fake, kinds=["object"])


def test_llm_perturber_runs_a_local_transformers_model(tmp_path):
    """A tiny random GPT-2 with a word-level tokenizer, saved and loaded like a real local model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    words = sorted(set("a red blue green cat dog on the mat caption new".split()))
    vocab = {w: i for i, w in enumerate(["[UNK]", "[EOS]", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]").save_pretrained(tmp_path)
    config = GPT2Config(vocab_size=len(vocab), n_embd=16, n_layer=1, n_head=2, n_positions=256)
    GPT2LMHeadModel(config).save_pretrained(tmp_path)
    perturber = LLMPerturber(str(tmp_path), max_new_tokens=6, device="cpu")
    answer = perturber.generate("a red cat", 1)
    assert answer.split() and set(answer.split()) <= set(vocab) and answer == perturber.generate("a red cat", 1)
    a = perturber.perturb_many("a red cat on the mat", 2, 0, 0)
    b = LLMPerturber(str(tmp_path), max_new_tokens=6, device="cpu").perturb_many("a red cat on the mat", 2, 0, 0)
    assert a == b
    assert all(changes_meaning(r.caption, r.mismatched_caption) for r in a)


def test_confusable_perturber_edits_one_word_to_a_close_colour_or_another_shape():
    from diffalign.toyworld import parse_caption
    from diffalign.toyworld.perturb import ConfusablePerturber

    perturber = ConfusablePerturber(nearest=2)
    # nearest palette colours by RGB distance: red (200, 40, 40) -> brown (135, 80, 40), then purple (135, 60, 175)
    assert perturber.closest("red", exclude="grey") == ["brown", "purple"]
    assert "brown" not in perturber.closest("red", exclude="brown")
    kinds = set()
    for i, caption in enumerate(prompts("train")):
        for p in perturber.perturb_many(caption, 3, seed=0, key=i):
            assert changes_meaning(caption, p.mismatched_caption) and p.mismatched_caption != caption
            old, new = parse_caption(caption), parse_caption(p.mismatched_caption)  # still a valid toy caption
            changed = [j for j in range(3) if old[j] != new[j]]
            assert len(changed) == 1 and new[1] != new[2]  # one word; shape colour never equals the background
            if changed[0] == 1:
                assert new[1] in perturber.closest(old[1], exclude=old[2])
            if changed[0] == 2:
                assert new[2] in perturber.closest(old[2], exclude=old[1])
            kinds.add(changed[0])
    assert kinds == {0, 1, 2}
    assert ConfusablePerturber().perturb("a cat on a mat", random.Random(0)) is None  # not a toy caption
