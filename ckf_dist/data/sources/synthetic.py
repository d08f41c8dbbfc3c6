"""A seeded synthetic log in the Amazon-2018 file format, with real collaborative signal.

Users and items get latent factors; a user picks items with probability increasing in
``u . v`` (so a CF model can learn who picks what) in a random chronological order, and
rates them ``3 + 1.2 * u.v + item bias + noise`` clipped to 1..5. Titles carry the item's
dominant factor as a "style" word and reviews/summaries follow the rating, so text and
CF signal agree. Used by tests, the review task and the demo when no real dump exists.
"""

from __future__ import annotations

import gzip
import json

import fsspec
import numpy as np

from ckf_dist.storage import join

STYLES = ["Cosmic", "Rustic", "Neon", "Velvet", "Arctic", "Golden", "Shadow", "Crystal", "Coral", "Ember"]
NOUNS = ["Lamp", "Novel", "Kettle", "Jacket", "Board Game", "Speaker", "Backpack", "Puzzle", "Candle", "Mug"]
SUMMARIES = {1: ["Waste of money", "Very disappointed"], 2: ["Not great", "Below expectations"],
             3: ["It is okay", "Average at best"], 4: ["Pretty good", "Solid choice"],
             5: ["Five stars, love it", "Absolutely perfect"]}
REVIEWS = {1: "Disappointed with this {noun}. The {style} look is not for me and it broke quickly.",
           2: "This {noun} has problems. The {style} finish felt cheap.",
           3: "An average {noun}. The {style} design is fine but nothing special.",
           4: "A good {noun}. I like the {style} style and it works well.",
           5: "Absolutely love this {noun}! The {style} style is exactly my taste."}
REVIEWS_FILE = "reviews_Synthetic.json.gz"
META_FILE = "meta_Synthetic.json.gz"
KEY_BLOCK_ELEMENTS = 2_000_000       # Gumbel keys held at once (users x items): 16 MB


def write_synthetic(folder: str, n_users: int = 300, n_items: int = 200, per_user: int = 30,
                    seed: int = 0, dim: int = 4) -> dict[str, str]:
    """Write ``reviews_Synthetic.json.gz`` and ``meta_Synthetic.json.gz`` under ``folder``."""
    if per_user > n_items:
        raise ValueError(f"synthetic_interactions_per_user ({per_user}) > synthetic_items ({n_items})")
    rng = np.random.default_rng(seed)
    users = rng.normal(size=(n_users, dim))
    items = rng.normal(size=(n_items, dim))
    bias = rng.normal(0.0, 0.3, size=n_items)
    dominant = np.abs(items).argmax(axis=1)
    style_idx = (2 * dominant + (items[np.arange(n_items), dominant] > 0)) % len(STYLES)
    titles = [f"{STYLES[style_idx[i]]} {NOUNS[i % len(NOUNS)]} {i}" for i in range(n_items)]
    # Gumbel top-k = sampling without replacement with P(item) ~ exp(2 * affinity). The Gumbel
    # keys of all users come next in the generator's stream (one 64-bit draw each): a copy of the
    # generator draws them block by block of users while the original skips past them, so memory
    # stays at one block of users x items whatever the log size, with the stream of one big draw.
    keys_rng = np.random.default_rng(seed)
    keys_rng.bit_generator.state = rng.bit_generator.state
    rng.bit_generator.advance(n_users * n_items)
    base = 1_400_000_000
    block = max(1, KEY_BLOCK_ELEMENTS // n_items)
    fs_open = lambda name: fsspec.open(join(folder, name), "wb")  # noqa: E731
    with fs_open(REVIEWS_FILE) as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        for u0 in range(0, n_users, block):
            affinity = users[u0:u0 + block] @ items.T / np.sqrt(dim)
            keys = 2.0 * affinity + keys_rng.gumbel(size=affinity.shape)
            chosen = np.argsort(-keys, axis=1)[:, :per_user]
            lines = []
            for du in range(len(affinity)):
                u = u0 + du
                order = rng.permutation(chosen[du])       # chronology independent of affinity
                times = base + np.sort(rng.integers(0, 10**8, size=per_user))
                noise = rng.normal(0.0, 0.5, size=per_user)
                for k, i in enumerate(order):
                    r = int(np.clip(np.rint(3 + 1.2 * affinity[du, i] + bias[i] + noise[k]), 1, 5))
                    style, noun = STYLES[style_idx[i]].lower(), NOUNS[i % len(NOUNS)].lower()
                    rec = {"overall": float(r), "verified": True, "reviewerID": f"U{u:05d}", "asin": f"B{i:06d}",
                           "reviewText": REVIEWS[r].format(noun=noun, style=style),
                           "summary": SUMMARIES[r][int(rng.integers(2))], "unixReviewTime": int(times[k])}
                    lines.append(json.dumps(rec))
            f.write(("\n".join(lines) + "\n").encode())
    with fs_open(META_FILE) as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        for i in range(n_items):
            f.write((json.dumps({"asin": f"B{i:06d}", "title": titles[i], "category": ["Synthetic"]}) + "\n").encode())
    return {"reviews": join(folder, REVIEWS_FILE), "meta": join(folder, META_FILE)}
