"""An experiment's stages read and split a data file once; an edited file is read again."""

import json
import os

import distillqa.data as data
from distillqa.config import DataConfig
from distillqa.data.splits import SPLITS


def _write(path, n):
    rows = [{"id": f"q{i}", "question": f"What is item {i}?", "answers": [f"item {i}"], "context": f"Item {i} is here."}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_same_file_is_read_once_and_callers_get_their_own_lists(tmp_path, monkeypatch):
    path = tmp_path / "qa.jsonl"
    _write(path, 20)
    reads = []
    real = data.load_examples
    monkeypatch.setattr(data, "load_examples", lambda *a: reads.append(a) or real(*a))
    cfg = DataConfig(source=str(path))
    first, _ = data.load_splits(cfg)
    first["train"].clear()  # a caller that changes its lists does not change the next caller's
    second, _ = data.load_splits(cfg)
    assert len(reads) == 1
    assert sum(len(second[name]) for name in SPLITS) == 20 and len(second["all"]) == 20

    # another config (another split seed) is split again, with its own result
    other, _ = data.load_splits(DataConfig(source=str(path), split_seed=1))
    assert len(reads) == 2 and [e.id for e in other["test"]] != [e.id for e in second["test"]]


def test_edited_file_is_read_again(tmp_path):
    path = tmp_path / "qa.jsonl"
    _write(path, 20)
    cfg = DataConfig(source=str(path))
    assert len(data.load_splits(cfg)[0]["all"]) == 20
    _write(path, 30)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # the same second on a coarse clock
    assert len(data.load_splits(cfg)[0]["all"]) == 30
