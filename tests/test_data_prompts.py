"""Prompts: slot positions exact, text variant = CF variant minus slots, answers and lengths."""

from __future__ import annotations

import dataclasses

import pytest

from ckf_dist.data.config import DataConfig
from ckf_dist.data.errors import DataError
from ckf_dist.data.prompts import ITEM_SLOT, USER_SLOT, PromptBuilder
from ckf_dist.data.protocol import build_protocol
from ckf_dist.data.sources import load_interactions
from ckf_dist.resources import load_tokenizer

CFG = DataConfig(source="synthetic", synthetic_users=40, synthetic_items=30, synthetic_interactions_per_user=12,
                 max_history=5, n_candidates=5, max_review_tokens=8)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("smollm2")


@pytest.fixture(scope="module")
def proto():
    return build_protocol(load_interactions(CFG, seed=1), CFG, seed=1)


@pytest.fixture(scope="module")
def built(tok, proto):
    vocab = len(tok)
    builder = PromptBuilder(tok, proto.titles, max_review_tokens=CFG.max_review_tokens)
    rows = [(s, builder.build(dataclasses.replace(s))) for s in proto.samples]
    assert len(tok) == vocab                                  # the vocabulary is never extended
    return builder, rows


def test_text_variant_is_cf_variant_without_slots(built):
    builder, rows = built
    for s, r in rows:
        slots = set(r["slot_pos"])
        assert r["text_ids"] == [t for p, t in enumerate(r["cf_ids"]) if p not in slots]
        assert r["text_prompt_len"] == r["cf_prompt_len"] - len(slots)
        assert all(p < r["cf_prompt_len"] for p in slots)              # slots only in the prompt
        assert builder.slot_id not in r["text_ids"][: r["text_prompt_len"]] or builder.slot_id == builder.eos_id


def test_slot_positions_kinds_and_ids_are_exact(built):
    builder, rows = built
    for s, r in rows:
        assert all(r["cf_ids"][p] == builder.slot_id for p in r["slot_pos"])
        assert r["slot_kind"][0] == USER_SLOT and r["slot_cf_id"][0] == s.user
        assert set(r["slot_kind"][1:]) == {ITEM_SLOT}
        shown = r["history"] + (s.candidates if s.task == "sequential" else [s.item])
        assert r["slot_cf_id"][1:] == shown
        for p, item in zip(r["slot_pos"][1:], r["slot_cf_id"][1:]):   # each item slot follows that item's title
            title = builder.title_ids[item]
            assert r["cf_ids"][p - len(title):p] == title


def test_answers_and_answer_tokens(built, tok):
    builder, rows = built
    ans = builder.answer_tokens()
    assert ans["ctr"] == [tok.encode(" No", add_special_tokens=False)[-1], tok.encode(" Yes", add_special_tokens=False)[-1]]
    assert len(set(ans["rating"])) == 5 and tok.decode(ans["rating"]) == "12345"
    for s, r in rows:
        answer = r["cf_ids"][r["cf_prompt_len"]:]
        assert answer[-1] == builder.eos_id and answer == r["text_ids"][r["text_prompt_len"]:]
        if s.task == "ctr":
            assert answer[0] == ans["ctr"][int(s.label)] and r["answer_text"] in ("Yes", "No")
        elif s.task == "rating":
            assert answer[0] == ans["rating"][int(s.rating) - 1] and r["answer_text"] == str(int(s.rating))
        elif s.task == "sequential":
            assert answer == r["cand_ids"][int(s.label)] and len(r["cand_ids"]) == CFG.n_candidates
            assert tok.decode(answer[:-1]).strip() == builder.titles[s.item] == r["answer_text"]
        else:
            assert 1 <= len(answer) - 1 <= CFG.max_review_tokens and r["answer_text"]
            assert s.text.startswith(r["answer_text"][:10])


def test_prompts_read_naturally_and_stay_short(built, tok):
    builder, rows = built
    for s, r in rows:
        text = tok.decode(r["text_ids"][: r["text_prompt_len"]])
        assert text.startswith("User ") and builder.titles[s.item if s.task != "sequential" else s.candidates[0]] in text
        assert len(r["cf_ids"]) <= 200
    lengths = [len(r["cf_ids"]) for _, r in rows]
    assert 40 < sum(lengths) / len(lengths) < 150


def test_history_trimmed_to_fit_max_length(tok, proto):
    builder = PromptBuilder(tok, proto.titles, max_length=60)
    s = next(s for s in proto.samples if s.task == "rating" and len(s.history) == CFG.max_history)
    r = builder.build(dataclasses.replace(s))
    assert len(r["cf_ids"]) <= 60 and 0 < len(r["history"]) < CFG.max_history
    assert r["history"] == s.history[-len(r["history"]):]                # the most recent items are kept
    with pytest.raises(DataError, match="max_length=20"):
        PromptBuilder(tok, proto.titles, max_length=20).build(dataclasses.replace(s))


def test_titles_are_cleaned_and_truncated(tok):
    b = PromptBuilder(tok, ["  A   very\nlong title indeed ", ""], max_title_chars=10)
    assert b.titles == ["A very lon", "untitled"]


def test_letter_answers_label_the_options_and_score_one_token_each(tok, proto):
    """sequential_answer="letter": options read "A. title <I>; B. ...", the answer is the true
    option's letter, every candidate's answer is one distinct token + eos, slots and the text
    variant are unchanged in kind; other tasks are untouched."""
    title = PromptBuilder(tok, proto.titles)
    letter = PromptBuilder(tok, proto.titles, sequential_answer="letter")
    seen = 0
    for s in proto.samples:
        a, b = title.build(dataclasses.replace(s)), letter.build(dataclasses.replace(s))
        if s.task != "sequential":
            assert a == b
            continue
        seen += 1
        firsts = [c[0] for c in b["cand_ids"]]
        assert all(len(c) == 2 and c[1] == letter.eos_id for c in b["cand_ids"]) and len(set(firsts)) == len(firsts)
        k = int(s.label)
        assert b["cf_ids"][b["cf_prompt_len"]:] == b["cand_ids"][k] and b["answer_text"] == "ABCDEFGHIJ"[k]
        assert tok.decode(b["cand_ids"][k][:1]).strip() == b["answer_text"]
        text = tok.decode(b["text_ids"][: b["text_prompt_len"]])
        for j, c in enumerate(s.candidates):
            assert f" {'ABCDEFGHIJ'[j]}. {letter.titles[c]}" in text
        assert text.endswith(" Answer:" + tok.decode(letter.letter_prefix))
        assert b["slot_cf_id"] == a["slot_cf_id"] and b["text_ids"] == [t for p, t in enumerate(b["cf_ids"])
                                                                         if p not in set(b["slot_pos"])]
    assert seen > 0
    with pytest.raises(DataError, match="sequential_answer"):
        PromptBuilder(tok, proto.titles, sequential_answer="index")
    with pytest.raises(ValueError, match="n_candidates: at most 26"):
        DataConfig(sequential_answer="letter", n_candidates=30).validate()
