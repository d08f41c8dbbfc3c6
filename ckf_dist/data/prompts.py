"""The four task prompts, in a text-only and a CF-slot variant, tokenized segment by segment.

A prompt is a list of *segments*: text (tokenized on its own, cached) or a :class:`Slot`.
The CF variant puts one placeholder token per slot (the tokenizer's unk token, or eos:
its embedding is overwritten by the bridge, so the vocabulary never changes) and records
slot positions, kinds and CF ids; the text variant is the same token sequence with every
slot removed, so ``text_ids == [t for p, t in enumerate(cf_ids) if p not in slot_pos]``.

The sequential answer is the chosen item's title (the paper's format) or, with
``sequential_answer="letter"``, the option's letter: one token per candidate, so the training
loss is spent on the choice rather than on copying a title, and every candidate is scored
from one position's distribution.

Answers end with eos. Where all answers of a classification task share leading tokens
(SmolLM2 splits " 4" into " " + "4"), the shared tokens move into the prompt, so the
*first* answer token alone tells the classes apart; ``answer_tokens()`` lists those ids.

    ctr        User <U> rated: Heat <I> (4); Fargo <I> (5). Will the user like Alien <I>? Answer: Yes
    rating     User <U> rated: ... How will the user rate Alien <I> (1-5)? Rating: 4
    sequential User <U> chose: Heat <I>; Fargo <I>. Which is next? Options: Alien <I>; Up <I>; ... Answer: Up
    (sequential_answer="letter": ... Options: A. Alien <I>; B. Up <I>; ... Answer: B)
    review     User <U> rated: ... Write the user's short review of Alien <I>: Great film
"""

from __future__ import annotations

from dataclasses import dataclass

from ckf_dist.contract import ITEM_SLOT, TASKS, USER_SLOT
from ckf_dist.data.errors import DataError
from ckf_dist.data.protocol import Sample

CTR_ANSWERS = (" No", " Yes")                       # label 0 / 1
RATING_ANSWERS = tuple(f" {r}" for r in range(1, 6))
LETTERS = tuple(chr(ord("A") + k) for k in range(26))      # sequential_answer="letter": option labels
SEQUENTIAL_ANSWERS = ("title", "letter")


@dataclass(frozen=True, slots=True)
class Slot:
    """A CF placeholder: ``kind`` 0 = user, 1 = item; ``cf_id`` the CF user/item id."""

    kind: int
    cf_id: int


def _rating_text(r: float) -> str:
    return f"{r:g}"


class PromptBuilder:
    """Builds the token rows of samples for one tokenizer and one item-title table."""

    def __init__(self, tokenizer, titles: list[str], max_title_chars: int = 80, max_review_tokens: int = 32,
                 max_length: int = 512, sequential_answer: str = "title"):
        self.tok = tokenizer
        self.eos_id = tokenizer.eos_token_id
        if self.eos_id is None:
            raise DataError("tokenizer has no eos token; answers must end with one")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        self.slot_id = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else self.eos_id
        self.max_review_tokens, self.max_length = max_review_tokens, max_length
        self._cache: dict[str, list[int]] = {}
        self.titles = [" ".join(t.split())[:max_title_chars].rstrip() or "untitled" for t in titles]
        self.title_ids = self.encode_many([" " + t for t in self.titles])
        self.ctr_prefix, self.ctr_first = self._classes(CTR_ANSWERS)
        self.rating_prefix, self.rating_first = self._classes(RATING_ANSWERS)
        if sequential_answer not in SEQUENTIAL_ANSWERS:
            raise DataError(f"data.sequential_answer: one of {SEQUENTIAL_ANSWERS}, got {sequential_answer!r}")
        self.sequential_answer = sequential_answer
        if sequential_answer == "letter":
            self.letter_prefix, self.letter_first = self._classes(tuple(" " + c for c in LETTERS))

    # ------------------------------------------------------------------ tokenization
    def encode_many(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text (no special tokens), cached."""
        todo = list({t for t in texts if t not in self._cache})
        if todo:
            for t, ids in zip(todo, self.tok(todo, add_special_tokens=False)["input_ids"]):
                self._cache[t] = list(ids)
        return [self._cache[t] for t in texts]

    def encode(self, text: str) -> list[int]:
        return self._cache[text] if text in self._cache else self.encode_many([text])[0]

    def _classes(self, answers: tuple[str, ...]) -> tuple[list[int], list[list[int]]]:
        """(shared leading tokens, per-answer remaining tokens); first remaining token must differ."""
        ids = self.encode_many(list(answers))
        n = 0
        while all(len(x) > n + 1 for x in ids) and len({x[n] for x in ids}) == 1:
            n += 1
        rest = [x[n:] for x in ids]
        if len({x[0] for x in rest}) != len(rest):
            raise DataError(f"tokenizer cannot tell the answers {answers} apart by their first token")
        return ids[0][:n], rest

    def answer_tokens(self) -> dict[str, list[int]]:
        """First answer token per class: ``{"ctr": [no, yes], "rating": ["1".."5"]}`` (for the manifest)."""
        return {"ctr": [x[0] for x in self.ctr_first], "rating": [x[0] for x in self.rating_first]}

    # ------------------------------------------------------------------ templates
    def _history(self, s: Sample, with_ratings: bool) -> list:
        segs: list = []
        n = len(s.history)
        for k, (item, r) in enumerate(zip(s.history, s.history_ratings)):
            end = "." if k == n - 1 else ";"
            segs += [("title", item), Slot(ITEM_SLOT, item), (f" ({_rating_text(r)})" if with_ratings else "") + end]
        if not n:
            segs.append(" nothing yet.")
        return segs

    def segments(self, s: Sample) -> tuple[list, list[int], str, list[list[int]]]:
        """(prompt segments, answer token ids, answer text, candidates' answer ids) of a sample."""
        head = ["User", Slot(USER_SLOT, s.user)]
        target = [("title", s.item), Slot(ITEM_SLOT, s.item)]
        if s.task == "ctr":
            segs = head + [" rated:"] + self._history(s, True) + [" Will the user like"] + target + ["? Answer:"]
            yes = int(s.label >= 0.5)
            return segs + [self.ctr_prefix], self.ctr_first[yes] + [self.eos_id], CTR_ANSWERS[yes].strip(), []
        if s.task == "rating":
            r = min(5, max(1, int(round(s.rating))))
            segs = head + [" rated:"] + self._history(s, True) + [" How will the user rate"] + target + [" (1-5)? Rating:"]
            return segs + [self.rating_prefix], self.rating_first[r - 1] + [self.eos_id], str(r), []
        if s.task == "sequential":
            segs = head + [" chose:"] + self._history(s, False) + [" Which is next? Options:"]
            letters = self.sequential_answer == "letter"
            if letters and len(s.candidates) > len(LETTERS):
                raise DataError(f"a sequential sample of user {s.user} has {len(s.candidates)} candidates; "
                                f"data.sequential_answer: letter labels at most {len(LETTERS)} (lower data.n_candidates)")
            for k, c in enumerate(s.candidates):
                segs += ([f" {LETTERS[k]}."] if letters else []) + [("title", c), Slot(ITEM_SLOT, c),
                                                                   "." if k == len(s.candidates) - 1 else ";"]
            if letters:
                cand = [self.letter_first[k] + [self.eos_id] for k in range(len(s.candidates))]
                return segs + [" Answer:", self.letter_prefix], cand[int(s.label)], LETTERS[int(s.label)], cand
            cand = [self.title_ids[c] + [self.eos_id] for c in s.candidates]
            return segs + [" Answer:"], cand[int(s.label)], self.titles[s.item], cand
        if s.task == "review":
            segs = head + [" rated:"] + self._history(s, True) + [" Write the user's short review of"] + target + [":"]
            ids = self.encode(" " + s.text)[: self.max_review_tokens]
            return segs, ids + [self.eos_id], self.tok.decode(ids).strip(), []
        raise DataError(f"unknown task {s.task!r}; tasks are {TASKS}")

    def render(self, segs: list) -> tuple[list[int], list[int], list[int], list[int]]:
        """CF-variant token ids of the prompt segments, with slot positions, kinds and CF ids."""
        ids: list[int] = []
        pos, kind, cf = [], [], []
        for seg in segs:
            if isinstance(seg, Slot):
                pos.append(len(ids))
                kind.append(seg.kind)
                cf.append(seg.cf_id)
                ids.append(self.slot_id)
            elif isinstance(seg, tuple):
                ids += self.title_ids[seg[1]]
            elif isinstance(seg, list):
                ids += seg
            elif seg:
                ids += self.encode(seg)
        return ids, pos, kind, cf

    def build(self, s: Sample) -> dict:
        """The token columns of one shard row (see docs/architecture.md); history trimmed to fit max_length."""
        while True:
            segs, answer, answer_text, cand = self.segments(s)
            prompt, pos, kind, cf = self.render(segs)
            if len(prompt) + len(answer) <= self.max_length:
                break
            if not s.history:
                raise DataError(f"a {s.task} prompt of user {s.user} has {len(prompt) + len(answer)} tokens without any history, "
                                f"over data.max_length={self.max_length}; raise max_length or lower max_title_chars")
            s.history, s.history_ratings = s.history[1:], s.history_ratings[1:]
        slots = set(pos)
        text_prompt = [t for p, t in enumerate(prompt) if p not in slots]
        return {
            "history": s.history,
            "text_ids": text_prompt + answer, "text_prompt_len": len(text_prompt),
            "cf_ids": prompt + answer, "cf_prompt_len": len(prompt),
            "slot_pos": pos, "slot_kind": kind, "slot_cf_id": cf,
            "cand_ids": cand, "answer_text": answer_text,
        }
