"""Data pipeline: readers, formats and loss masks, packing, deterministic shuffling, resume, bad data."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import pytest

from gemmax.train.data import (
    Batch,
    DataError,
    Dataset,
    Record,
    pack_rows,
    read_records,
    render_example,
    tokenize_example,
)


class ByteTokenizer:
    """Byte-level stand-in: id = byte + 3; 0 pad, 1 eos, 2 bos."""

    pad_id, eos_id, bos_id = 0, 1, 2

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        return ([self.bos_id] if add_bos else []) + [b + 3 for b in text.encode("utf-8")]

    def decode(self, ids) -> str:
        return bytes(int(i) - 3 for i in ids if int(i) >= 3).decode("utf-8")


TOK = ByteTokenizer()


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _jsonl(path: Path, rows: list[dict]) -> Path:
    return _write(path, "".join(json.dumps(r) + "\n" for r in rows))


def _targets_text(batch: Batch, row: int = 0) -> str:
    m = batch.loss_mask[row] > 0
    return TOK.decode(batch.targets[row][m])


# ---- formats and masks ----------------------------------------------------------------------------


def test_plain_text_lines(tmp_path):
    p = _write(tmp_path / "a.txt", "hello\n\nworld!\n")
    ds = Dataset.from_source(p, TOK, sequence_length=32)
    assert ds.stats["documents"] == 2
    b = next(ds.iterator(1, shuffle=False))
    assert b.tokens.dtype == np.int32 and b.loss_mask.dtype == np.float32
    # one packed row; inputs <bos>hello <bos>world!, targets hello<eos> world!<eos>
    row = b.tokens[0]
    assert row[0] == TOK.bos_id and TOK.decode(row[1:6]) == "hello" and row[6] == TOK.bos_id
    np.testing.assert_array_equal(b.targets[0, :6], TOK.encode("hello") + [TOK.eos_id])
    np.testing.assert_array_equal(b.targets[0, 6:13], TOK.encode("world!") + [TOK.eos_id])
    assert _targets_text(b) == "helloworld!"
    assert (b.targets[0][b.loss_mask[0] > 0] == TOK.eos_id).sum() == 2  # EOS is learned
    np.testing.assert_array_equal(b.segment_ids[0, :14], [1] * 6 + [2] * 7 + [0])
    np.testing.assert_array_equal(b.positions[0, :13], list(range(6)) + list(range(7)))
    assert b.positions[0, 13:].sum() == 0 and b.loss_mask[0, 13:].sum() == 0


def test_text_split_modes(tmp_path):
    p = _write(tmp_path / "a.md", "a\nb\n\nc\n")
    assert [r.data["text"] for r in read_records(p, text_split="paragraph")] == ["a\nb", "c"]
    assert [r.origin for r in read_records(p, text_split="paragraph")] == [f"{p}:1", f"{p}:4"]
    assert len(read_records(p, text_split="file")) == 1
    with pytest.raises(DataError, match="text_split"):
        read_records(p, text_split="word")


def test_prompt_completion_mask(tmp_path):
    p = _jsonl(tmp_path / "pc.jsonl", [{"prompt": "Q: 2+2?\nA:", "completion": " 4"}])
    ds = Dataset.from_source(p, TOK, sequence_length=64)
    b = next(ds.iterator(1, shuffle=False))
    assert _targets_text(b) == " 4"
    assert b.targets[0][b.loss_mask[0] > 0][-1] == TOK.eos_id
    assert b.loss_mask[0].sum() == 3  # " ", "4", EOS


def test_chat_mask_and_turn_format():
    conv = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
        {"role": "model", "content": "Ciao"},
    ]}
    ex = render_example(Record(conv, "x:1"))
    full = "".join(t for t, _ in ex.pieces)
    assert full == ("<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
                    "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\nCiao<end_of_turn>\n")
    doc = tokenize_example(ex, TOK)
    assert doc.ids[0] == TOK.bos_id and doc.ids[-1] != TOK.eos_id  # turns end with <end_of_turn>
    ds = Dataset.from_source([conv], TOK, sequence_length=256)
    b = next(ds.iterator(1, shuffle=False))
    assert _targets_text(b) == "Hello!<end_of_turn>Ciao<end_of_turn>"


def test_auto_detection_and_explicit_format_errors():
    with pytest.raises(DataError, match=r"<list>:item 0: cannot tell the format"):
        Dataset.from_source([{"question": "x"}], TOK, 16)
    with pytest.raises(DataError, match=r"missing field 'completion'"):
        Dataset.from_source([{"prompt": "x", "text": "y"}], TOK, 16, format="prompt_completion")
    with pytest.raises(DataError, match="unknown format"):
        Dataset.from_source([{"text": "x"}], TOK, 16, format="alpaca")
    with pytest.raises(DataError, match="no model/assistant turn"):
        Dataset.from_source([{"messages": [{"role": "user", "content": "x"}]}], TOK, 16)
    with pytest.raises(DataError, match="unknown role"):
        Dataset.from_source([{"messages": [{"role": "bot", "content": "x"}]}], TOK, 16)
    ds = Dataset.from_source([{"body": "abc"}], TOK, 16, text_field="body")
    assert ds.stats["tokens"] == 4


# ---- readers ---------------------------------------------------------------------------------------


def test_csv_parquet_json_array_and_hf_give_same_examples(tmp_path):
    rows = [{"prompt": f"p{i},\"q\"", "completion": f"c{i}\nmore"} for i in range(5)]
    import csv

    with open(tmp_path / "d.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["prompt", "completion"])
        w.writeheader()
        w.writerows(rows)
    pa = importlib.import_module("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    _write(tmp_path / "d.json", json.dumps(rows))
    _jsonl(tmp_path / "d.jsonl", rows)
    sources = [tmp_path / "d.csv", tmp_path / "d.parquet", tmp_path / "d.json", tmp_path / "d.jsonl", rows]
    datasets = importlib.import_module("datasets")
    hf = datasets.Dataset.from_list(rows)
    hf.save_to_disk(str(tmp_path / "saved"))
    sources += [hf, tmp_path / "saved", "hf:json", ]
    seen = []
    for s in sources:
        if s == "hf:json":  # the generic builder on local files works offline
            recs = datasets.load_dataset("json", data_files=str(tmp_path / "d.jsonl"), split="train")
            s = recs
        seen.append([r.data for r in read_records(s)])
    for s in seen:
        assert s == rows
    # CSV origins are the physical line where each record starts (records span two lines here)
    assert [r.origin.rsplit(":", 1)[1] for r in read_records(tmp_path / "d.csv")] == ["2", "4", "6", "8", "10"]
    # a folder reads every data file in it
    assert len(read_records(tmp_path / "saved")) == 5


def test_bad_data_errors_name_file_and_line(tmp_path):
    p = _write(tmp_path / "bad.jsonl", '{"text": "ok"}\n{"text": "broken"\n')
    with pytest.raises(DataError, match=rf"{p}:2: malformed JSON"):
        Dataset.from_source(p, TOK, 16)
    p = _write(tmp_path / "arr.jsonl", '{"text": "ok"}\n[1, 2]\n')
    with pytest.raises(DataError, match=rf"{p}:2: expected a JSON object"):
        read_records(p)
    p = _jsonl(tmp_path / "miss.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "a"}])
    with pytest.raises(DataError, match=rf"{p}:2: cannot tell the format"):
        Dataset.from_source(p, TOK, 16)
    with pytest.raises(DataError, match=rf"{p}:2: missing field 'completion'"):
        Dataset.from_source(p, TOK, 16, format="prompt_completion")
    p = _jsonl(tmp_path / "type.jsonl", [{"text": 3}])
    with pytest.raises(DataError, match=rf"{p}:1: field 'text' must be text"):
        Dataset.from_source(p, TOK, 16)
    p = _write(tmp_path / "empty.jsonl", "")
    with pytest.raises(DataError, match=rf"{p}: empty file"):
        read_records(p)
    p = _write(tmp_path / "blank.txt", "\n\n  \n")
    with pytest.raises(DataError, match=rf"{p}: no examples"):
        read_records(p)
    p = _write(tmp_path / "data.xml", "<a/>")
    with pytest.raises(DataError, match="unknown file type"):
        read_records(p)
    with pytest.raises(DataError, match="no such file"):
        read_records(tmp_path / "nope.jsonl")
    p = _write(tmp_path / "wide.csv", "text\nabc,extra\n")
    with pytest.raises(DataError, match=rf"{p}:2: row has more fields"):
        read_records(p)
    p = _write(tmp_path / "nul.csv", "prompt,completion\nabc\n")
    with pytest.raises(DataError, match=rf"{p}:2: field 'completion' is empty"):
        Dataset.from_source(p, TOK, 16, format="prompt_completion")
    p = _write(tmp_path / "x.parquet", "not parquet")
    with pytest.raises(DataError, match="not a readable Parquet"):
        read_records(p)


# ---- truncation, packing, stats -------------------------------------------------------------------


def test_truncation_counted_and_stats():
    texts = ["a" * 30, "bb", "cccc"]
    ds = Dataset.from_source(texts, TOK, sequence_length=8)
    s = ds.stats
    assert s["documents"] == 3 and s["truncated"] == 1
    assert s["tokens"] == 8 + 3 + 5
    assert s["packed_rows"] == 2
    assert s["padding_fraction"] == pytest.approx(1 - 16 / 16)
    assert "1 truncated" in ds.report()
    b = next(ds.iterator(2, shuffle=False))
    # the long document fills a row by itself, cut at sequence_length positions
    assert (b.segment_ids[0] == 1).all() and b.positions[0, -1] == 7


def test_packing_never_splits_documents_and_respects_length():
    rng = np.random.default_rng(0)
    texts = ["x" * int(n) for n in rng.integers(1, 40, size=200)]
    ds = Dataset.from_source(texts, TOK, sequence_length=64)
    rows = pack_rows(ds.documents, 64)
    assert sorted(i for r in rows for i in r) == list(range(200))
    for r in rows:
        assert sum(len(ds.documents[i].ids) - 1 for i in r) <= 64
    assert ds.stats["padding_fraction"] < 0.1
    unpacked = Dataset.from_source(texts, TOK, sequence_length=64, pack=False)
    assert unpacked.stats["packed_rows"] == 200
    # no attention across documents: each row's segment ids are non-decreasing runs, positions restart
    for b in ds.evaluation(8):
        for r in range(8):
            seg, pos = b.segment_ids[r], b.positions[r]
            starts = np.flatnonzero(np.diff(seg, prepend=0) != 0)
            for st in starts:
                if seg[st]:
                    assert pos[st] == 0
            assert (np.diff(seg[seg > 0]) >= 0).all()


def test_evaluation_is_one_ordered_pass_with_padding_rows():
    texts = [f"doc {i}" * 3 for i in range(10)]
    ds = Dataset.from_source(texts, TOK, sequence_length=20, pack=False)
    batches = list(ds.evaluation(4))
    assert len(batches) == 3
    assert all(b.tokens.shape == (4, 20) for b in batches)
    assert batches[-1].loss_mask[2:].sum() == 0  # two empty rows pad the last batch
    got = [TOK.decode(b.tokens[r][b.segment_ids[r] > 0]) for b in batches for r in range(4)
           if b.segment_ids[r].any()]
    assert got == texts


# ---- shuffling and resume -------------------------------------------------------------------------


def _digest(batches) -> list[bytes]:
    return [b.tokens.tobytes() + b.loss_mask.tobytes() for b in batches]


def test_shuffle_is_deterministic_and_varies_with_seed_and_epoch():
    texts = [f"text number {i}" for i in range(40)]
    ds = Dataset.from_source(texts, TOK, sequence_length=32)
    it = ds.iterator(2, seed=3)
    n = it.batches_in_epoch(0)
    a = _digest(next(it) for _ in range(2 * n))
    again = ds.iterator(2, seed=3)
    assert _digest(next(again) for _ in range(2 * n)) == a
    other = ds.iterator(2, seed=4)
    assert _digest(next(other) for _ in range(n)) != a[:n]
    assert a[:n] != a[n:]  # a new permutation each epoch
    # every document is seen exactly once per epoch
    ep = ds.iterator(2, seed=3, num_epochs=1)
    seen = sorted(TOK.decode(b.tokens[r][b.segment_ids[r] == s]) for b in ep for r in range(2)
                  for s in set(b.segment_ids[r].tolist()) - {0})
    assert seen == sorted(texts)
    assert ep.state()["epoch"] == 1


def test_resume_continues_at_exactly_the_same_batch():
    texts = [f"sample {i} " * (i % 5 + 1) for i in range(30)]
    ds = Dataset.from_source(texts, TOK, sequence_length=48)
    ref = ds.iterator(3, seed=7)
    want = _digest(next(ref) for _ in range(12))
    it = ds.iterator(3, seed=7)
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(it.state()))  # as it would go through a checkpoint
    fresh = Dataset.from_source(texts, TOK, sequence_length=48).iterator(3, seed=7)
    fresh.restore(state)
    assert _digest(next(fresh) for _ in range(7)) == want[5:]
    with pytest.raises(ValueError, match="seed"):
        ds.iterator(3, seed=8).restore(state)
    with pytest.raises(ValueError, match="bad data-iterator state"):
        ds.iterator(3).restore({"epoch": 1})
