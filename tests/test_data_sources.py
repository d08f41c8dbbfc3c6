"""Source readers on small files written here, and every kind of bad input."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from ckf_dist.data.config import DataConfig
from ckf_dist.data.errors import BadRecords, DataError
from ckf_dist.data.sources import load_interactions, read_amazon, read_movielens_embedded, read_movielens_raw, read_yelp
from ckf_dist.data.sources.synthetic import write_synthetic


def _gz(path, lines: list[str | bytes]) -> str:
    with gzip.open(path, "wb") as f:
        for line in lines:
            f.write((line if isinstance(line, bytes) else line.encode()) + b"\n")
    return str(path)


def _review(user="A1", asin="B1", overall=5.0, t=100, text="nice", summary="good") -> str:
    return json.dumps({"reviewerID": user, "asin": asin, "overall": overall, "unixReviewTime": t,
                       "reviewText": text, "summary": summary})


# ----------------------------------------------------------------------------- readers


def test_movielens_embedded_is_the_full_ml100k():
    log = load_interactions(DataConfig())
    assert len(log) == 100_000 and len(log.titles) == 1682
    assert set(np.unique(log.ratings)) == {1.0, 2.0, 3.0, 4.0, 5.0}
    assert log.titles["1"] == "Toy Story" and log.texts is None and not log.has_text


def test_recbole_header_columns_found_by_name(tmp_path):
    (tmp_path / "ml-100k.inter").write_text("timestamp:float\titem_id:token\tuser_id:token\trating:float\n5\t10\t1\t4\n")
    (tmp_path / "ml-100k.item").write_text("item_id:token\tmovie_title:token_seq\n10\tHeat\n")
    log = read_movielens_embedded(str(tmp_path), BadRecords())
    assert (log.users, log.items, log.ratings.tolist(), log.timestamps.tolist()) == (["1"], ["10"], [4.0], [5.0])
    assert log.titles == {"10": "Heat"}


def test_movielens_raw_100k_latin1(tmp_path):
    (tmp_path / "u.data").write_text("1\t10\t4\t881250949\n2\t10\t2\t881250950\n")
    (tmp_path / "u.item").write_bytes("10|Caf\xe9 Society (1995)|01-Jan-1995||http://x|0|1\n".encode("latin-1"))
    log = read_movielens_raw(str(tmp_path), BadRecords(), "100k")
    assert log.users == ["1", "2"] and log.ratings.tolist() == [4.0, 2.0]
    assert log.titles["10"] == "Café Society (1995)"


def test_movielens_raw_1m(tmp_path):
    (tmp_path / "ratings.dat").write_text("1::1193::5::978300760\n1::661::3::978302109\n")
    (tmp_path / "movies.dat").write_bytes("1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n661::Ni\xf1o (1996)::Drama\n".encode("latin-1"))
    log = read_movielens_raw(str(tmp_path), BadRecords(), "1m")
    assert log.items == ["1193", "661"] and log.timestamps.tolist() == [978300760.0, 978302109.0]
    assert log.titles["661"] == "Niño (1996)"


def test_amazon2014_with_python_literal_metadata(tmp_path):
    _gz(tmp_path / "reviews_Books.json.gz", [_review("A1", "B1", 5.0, 10, "Great read", "Loved it"),
                                            _review("A2", "B2", 2.0, 11, "", "Meh")])
    _gz(tmp_path / "meta_Books.json.gz", ["{'asin': 'B1', 'title': \"Dune: the 'classic'\", 'categories': [['Books']]}",
                                         "{'asin': 'B2', 'salesRank': {'Books': 5}}"])     # no title: raw id later
    log = read_amazon(str(tmp_path), "", BadRecords(), 2014)
    assert log.users == ["A1", "A2"] and log.ratings.tolist() == [5.0, 2.0]
    assert log.texts.to_pylist() == ["Loved it", "Meh"]          # the summary, else the review text
    assert log.titles == {"B1": "Dune: the 'classic'"} and log.has_text


def test_amazon2018_reviews_and_meta_files(tmp_path):
    rev = _gz(tmp_path / "Movies_and_TV_5.json.gz", [_review("U", "X", 4.0, 3), _review("U", "Y", 1.0, 4)])
    meta = _gz(tmp_path / "meta_Movies_and_TV.json.gz", [json.dumps({"asin": "X", "title": "  Alien \n (1979) "})])
    log = read_amazon(rev, meta, BadRecords(), 2018)
    assert log.items == ["X", "Y"] and log.titles == {"X": "Alien (1979)"}


def test_yelp_review_and_business(tmp_path):
    (tmp_path / "yelp_academic_dataset_review.json").write_text(
        json.dumps({"user_id": "u1", "business_id": "b1", "stars": 4, "date": "2016-03-09 00:44:42", "text": "Tasty"}) + "\n" +
        json.dumps({"user_id": "u1", "business_id": "b2", "stars": 1, "date": "2016-03-10 00:00:00", "text": "Cold food"}) + "\n")
    (tmp_path / "yelp_academic_dataset_business.json").write_text(json.dumps({"business_id": "b1", "name": "Pho Place"}) + "\n")
    log = read_yelp(str(tmp_path), "", BadRecords())
    assert log.items == ["b1", "b2"] and log.texts.to_pylist() == ["Tasty", "Cold food"]
    assert log.timestamps[1] - log.timestamps[0] == pytest.approx(86400 - 2682)
    assert log.titles == {"b1": "Pho Place"}


def test_synthetic_is_seeded_and_has_cf_signal(tmp_path):
    a = write_synthetic(str(tmp_path / "a"), n_users=30, n_items=20, per_user=8, seed=3)
    write_synthetic(str(tmp_path / "b"), n_users=30, n_items=20, per_user=8, seed=3)
    write_synthetic(str(tmp_path / "c"), n_users=30, n_items=20, per_user=8, seed=4)
    raw = {k: gzip.open(tmp_path / k / "reviews_Synthetic.json.gz").read() for k in "abc"}
    assert raw["a"] == raw["b"] and raw["a"] != raw["c"]
    log = read_amazon(a["reviews"], a["meta"], BadRecords(), 2018)
    assert len(log) == 240 and len(set(log.users)) == 30 and len(log.titles) == 20
    assert all(log.texts.to_pylist()) and len(set(log.ratings.tolist())) >= 3
    cfg = DataConfig(source="synthetic", synthetic_users=30, synthetic_items=20, synthetic_interactions_per_user=8)
    assert load_interactions(cfg, seed=3).users == log.users        # the in-temp-folder path gives the same log


# ----------------------------------------------------------------------------- bad input


def _amazon(tmp_path, lines, policy="error"):
    _gz(tmp_path / "reviews_X.json.gz", lines)
    return read_amazon(str(tmp_path / "reviews_X.json.gz"), "", BadRecords(policy), 2018)


def test_malformed_json_names_file_and_line(tmp_path):
    with pytest.raises(DataError, match=r"reviews_X\.json\.gz:2: malformed JSON"):
        _amazon(tmp_path, [_review(), '{"reviewerID": "A", "asin": ', _review("B")])


def test_python_literal_only_accepted_for_2014(tmp_path):
    line = "{'reviewerID': 'A', 'asin': 'B', 'overall': 3.0, 'unixReviewTime': 5}"
    with pytest.raises(DataError, match="malformed JSON"):
        _amazon(tmp_path, [line])
    _gz(tmp_path / "reviews_Y.json.gz", [line])
    assert read_amazon(str(tmp_path / "reviews_Y.json.gz"), "", BadRecords(), 2014).users == ["A"]


def test_literal_eval_never_executes_code(tmp_path):
    _gz(tmp_path / "reviews_Z.json.gz", ["__import__('os').system('touch pwned')"])
    with pytest.raises(DataError, match="malformed JSON"):
        read_amazon(str(tmp_path / "reviews_Z.json.gz"), "", BadRecords(), 2014)
    assert not (tmp_path / "pwned").exists()


def test_missing_field_names_the_field(tmp_path):
    with pytest.raises(DataError, match=r"reviews_X\.json\.gz:1: field 'overall': missing"):
        _amazon(tmp_path, [json.dumps({"reviewerID": "A", "asin": "B", "unixReviewTime": 1})])


def test_rating_out_of_range(tmp_path):
    with pytest.raises(DataError, match=r":2: field 'overall': rating 7.0 outside \[1, 5\]"):
        _amazon(tmp_path, [_review(), _review(overall=7.0)])
    with pytest.raises(DataError, match="field 'overall': not a number"):
        _amazon(tmp_path, [_review(overall="five")])


def test_non_utf8_bytes(tmp_path):
    with pytest.raises(DataError, match=r"reviews_X\.json\.gz:2: bytes not valid utf-8"):
        _amazon(tmp_path, [_review(), b'{"reviewerID": "\xff\xfe", "asin": "B"}'])


def test_truncated_gzip(tmp_path):
    path = tmp_path / "reviews_X.json.gz"
    _gz(path, [_review(f"U{k}", t=k, text="x" * 200) for k in range(200)])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"reviews_X\.json\.gz: truncated or corrupt compressed file"):
        read_amazon(str(path), "", BadRecords(), 2018)
    log = read_amazon(str(path), "", BadRecords("skip"), 2018)       # skip: keeps what was readable, counts it
    assert 0 < len(log) < 200 and log.bad.by_reason["truncated_file"] == 1


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "u.data").write_text("")
    (tmp_path / "u.item").write_text("1|A|\n")
    with pytest.raises(DataError, match=r"u\.data: empty file"):
        read_movielens_raw(str(tmp_path), BadRecords(), "100k")
    with pytest.raises(DataError, match=r"ratings\.dat: file not found"):
        read_movielens_raw(str(tmp_path), BadRecords(), "1m")
    with pytest.raises(DataError, match="not found"):
        read_amazon(str(tmp_path / "nothing_here"), "", BadRecords(), 2018)


def test_bad_movielens_lines(tmp_path):
    (tmp_path / "u.data").write_text("1\t10\t4\t5\n1\t11\n1\t12\t9\t6\n")
    (tmp_path / "u.item").write_text("10|A|\n")
    with pytest.raises(DataError, match=r"u\.data:2: expected 4 fields"):
        read_movielens_raw(str(tmp_path), BadRecords(), "100k")
    log = read_movielens_raw(str(tmp_path), BadRecords("skip"), "100k")
    assert log.items == ["10"]
    assert log.bad.report()["by_reason"] == {"missing_field": 1, "rating_out_of_range": 1}


def test_skip_policy_counts_every_reason(tmp_path):
    lines = [_review("A"), "not json", json.dumps({"asin": "B"}), _review(overall=0.0), b"\xff\xff", _review("C"), "[1, 2]"]
    log = _amazon(tmp_path, lines, policy="skip")
    assert log.users == ["A", "C"]
    rep = log.bad.report()
    assert rep["skipped"] == 5
    assert rep["by_reason"] == {"malformed_json": 2, "missing_field": 1, "rating_out_of_range": 1, "not_utf8": 1}
    assert any(":2:" in e for e in rep["examples"])


def test_every_record_bad_is_an_error_even_when_skipping(tmp_path):
    with pytest.raises(DataError, match="no usable interaction records"):
        _amazon(tmp_path, ["junk", "more junk"], policy="skip")


def test_strict_record_types_are_bad_records(tmp_path):
    lines = [_review("A"), _review(overall=True), _review(t=True), _review(user=["a", "b"]), _review(asin={"x": 1}),
             _review(t=-5e18), _review(t=5e12), _review(user=7, asin=8), "[" * 200_000 + "]" * 200_000]
    log = _amazon(tmp_path, lines, policy="skip")
    assert log.users == ["A", "7"] and log.items == ["B1", "8"]
    rep = log.bad.report()
    assert rep["by_reason"] == {"bad_rating": 1, "bad_number": 1, "bad_id": 2, "timestamp_out_of_range": 2,
                                "malformed_json": 1}
    with pytest.raises(DataError, match=r"reviews_X\.json\.gz:2: field 'overall': not a number: True"):
        _amazon(tmp_path, lines)
    with pytest.raises(DataError, match=r":1: field 'reviewerID': expected a string or integer id, got list"):
        _amazon(tmp_path, [_review(user=["a", "b"])])
    with pytest.raises(DataError, match=r":1: JSON nested too deeply"):
        _amazon(tmp_path, ["[" * 200_000 + "]" * 200_000])
    with pytest.raises(DataError, match=r"field 'unixReviewTime': timestamp -5e\+18 is not Unix seconds"):
        _amazon(tmp_path, [_review(t=-5e18)])


def test_synthetic_writer_streams_users_in_blocks_with_the_same_log(tmp_path, monkeypatch):
    """The writer holds one block of users x items of Gumbel keys at a time; the log does not
    depend on the block size (a copy of the generator draws the keys, the original skips them)."""
    import ckf_dist.data.sources.synthetic as synthetic

    write_synthetic(str(tmp_path / "one"), n_users=40, n_items=25, per_user=9, seed=2)
    monkeypatch.setattr(synthetic, "KEY_BLOCK_ELEMENTS", 3 * 25)        # three users per block
    write_synthetic(str(tmp_path / "blocks"), n_users=40, n_items=25, per_user=9, seed=2)
    one, blocks = (gzip.open(tmp_path / k / "reviews_Synthetic.json.gz").read() for k in ("one", "blocks"))
    assert one == blocks and one.count(b"\n") == 40 * 9


def test_malformed_line_deep_in_a_large_gzip_is_named(tmp_path):
    """Reading streams the file: a bad record at line 120,001 is named with its line, and the
    table is compact (int32 codes per record, one id string per distinct user or item)."""
    lines = [_review(f"U{k % 4000}", f"B{k % 700}", 1.0 + k % 5, 1000 + k) for k in range(150_000)]
    lines[120_000] = '{"reviewerID": "U1", "asin": '
    path = _gz(tmp_path / "reviews_Big.json.gz", lines)
    with pytest.raises(DataError, match=r"reviews_Big\.json\.gz:120001: malformed JSON"):
        read_amazon(path, "", BadRecords(), 2018)
    log = read_amazon(path, "", BadRecords("skip"), 2018)
    assert len(log) == 149_999 and log.bad.skipped == 1
    assert log.user.dtype == np.int32 and log.item.dtype == np.int32
    assert len(log.user_ids) == 4000 and len(log.item_ids) == 700


def test_reading_prints_progress_with_counts_and_rate(tmp_path, monkeypatch, capsys):
    from ckf_dist.data.sources import base

    monkeypatch.setattr(base, "PROGRESS_EVERY", 2)
    path = _gz(tmp_path / "reviews_P.json.gz", [_review(f"U{k}", f"B{k % 2}") for k in range(5)])
    cfg = DataConfig(source="amazon2018", path=path)
    load_interactions(cfg, progress=False)
    assert capsys.readouterr().out == ""
    load_interactions(cfg, progress=True)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and "read 4 records (" in lines[1] and "4 users, 2 items, 0 skipped" in lines[1]
