"""The data contract shared by every stage and component, defined once.

Tasks and their ids, CF slot kinds, the ignore index of the loss, the shard columns, the
batch keys and the names of the files that mark an artefact complete. A module that needs
one of these imports it from here; nothing else defines them.
"""

from __future__ import annotations

TASKS = ("ctr", "sequential", "rating", "review")
"""Task keys in task-id order: a sample's ``task_id`` indexes this tuple."""
TASK_ID = {t: k for k, t in enumerate(TASKS)}
N_TASKS = len(TASKS)

SPLITS = ("train", "valid", "test")

USER_SLOT, ITEM_SLOT = 0, 1
"""``slot_kind`` values: a user slot takes the bridge's user token, an item slot its item token."""

IGNORE_INDEX = -100
"""Label of prompt and padding positions: the loss and the scorers skip them."""

STREAMS = ("text", "cf")
"""The two prompt variants of every row: text-only (slots removed) and with CF slots."""

# --------------------------------------------------------------------------- shards
LIST_COLUMNS = ("history", "text_ids", "cf_ids", "slot_pos", "slot_kind", "slot_cf_id", "candidates")
"""Shard columns holding one list of ints per row (``cand_ids`` is a list of lists)."""
SHARD_COLUMNS = ("sample_id", "split", "task", "task_id", "user", "item", "history", "warm", "text_ids",
                 "text_prompt_len", "cf_ids", "cf_prompt_len", "slot_pos", "slot_kind", "slot_cf_id", "label",
                 "candidates", "cand_ids", "answer_text")
"""Every column of a shard row, in storage order (types: ``ckf_dist.data.shards.SCHEMA``)."""

# --------------------------------------------------------------------------- batches
SLOT_KEYS = ("history", "slot_row", "slot_pos", "slot_kind", "slot_cf_id")
"""Batch keys the bridge reads to write the slot tokens (in the order ``Bridge.inject`` takes them)."""


# --------------------------------------------------------------------------- artefact files
DATASET_MANIFEST = "manifest.json"        # a prepared dataset is complete iff this exists (written last)
DATASET_MARKER = "_PREPARING.json"        # left by an unfinished `ckf prepare`
CHECKPOINT_MANIFEST = "manifest.json"     # a checkpoint's files, step, config and versions
COMMIT_MARKER = "COMMITTED"               # written last: a checkpoint without it is never picked
CHECKPOINT_EXPORT = "export/trainable.safetensors"   # the gathered trainable weights inside a checkpoint
CONSOLIDATED_META = "ckf_meta.json"       # a consolidated folder is complete iff this exists
TRAINABLE_FILE = "trainable.safetensors"  # the whole trainable state of a consolidated run
BRIDGE_FILE = "bridge.safetensors"        # the bridge alone, names as in Bridge.state_dict()
