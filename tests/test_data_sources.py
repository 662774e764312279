"""Every source type yields the same examples as JSON Lines, with locations users can find."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tests.data_fixtures import chat, make_tokenizer, write_jsonl
from tunelab.config import DataConfig
from tunelab.data.pipeline import load_tokenized, read_records
from tunelab.errors import DataError

INSTRUCTIONS = [
    {"instruction": "Where does Anna live?", "input": "", "output": "Anna lives in Paris."},
    {"instruction": "What is Bob?", "input": "Answer briefly.", "output": "A baker."},
    {"instruction": "Say hello.", "output": "Hello.", "system": "You are a helpful assistant."},
]
CHATS = [
    chat("Where does Anna live?", "In Paris.", system="Be brief."),
    chat("Hello.", "Hi.", "What is Bob?", "A baker."),
]


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def write_json(path: Path, records: list[dict]) -> Path:
    path.write_text(json.dumps(records, indent=2), encoding="utf-8")
    return path


def write_csv(path: Path, records: list[dict]) -> Path:
    keys = sorted({k for r in records for k in r})
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in records:
            w.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()})
    return path


def columns(records: list[dict]) -> list[dict]:
    """Rows with every key (null where absent): Arrow takes its schema from the first row."""
    keys = sorted({k for r in records for k in r})
    return [{k: r.get(k) for k in keys} for r in records]


def write_parquet(path: Path, records: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(columns(records)), path)
    return path


def write_dataset_dir(path: Path, records: list[dict]) -> Path:
    import datasets

    datasets.Dataset.from_list(columns(records)).save_to_disk(str(path))
    return path


WRITERS = {
    "json": (write_json, "data.json"),
    "csv": (write_csv, "data.csv"),
    "parquet": (write_parquet, "data.parquet"),
    "datasets": (write_dataset_dir, "saved"),
}


def examples(path: Path, tok) -> list[tuple[list[int], list[int]]]:
    data = load_tokenized(DataConfig(train=str(path), chat_template="chatml"), "train", tok, mask_prompt=True,
                          log=lambda m: None)
    return [(ex.input_ids, ex.labels) for ex in data.examples]


@pytest.mark.parametrize("kind", sorted(WRITERS))
@pytest.mark.parametrize("records", [INSTRUCTIONS, CHATS], ids=["instruction", "chat"])
def test_source_gives_the_same_examples_as_jsonl(tmp_path, tok, kind, records):
    reference = examples(write_jsonl(tmp_path / "data.jsonl", records), tok)
    writer, name = WRITERS[kind]
    assert examples(writer(tmp_path / name, records), tok) == reference


def test_locations(tmp_path):
    def wheres(path: Path) -> list[str]:
        return [w for w, _ in read_records(str(path))]

    j = write_json(tmp_path / "d.json", INSTRUCTIONS)  # indent=2: items start on lines 2, 7, 12
    assert wheres(j) == [f"{j}:2", f"{j}:7", f"{j}:12"]
    c = write_csv(tmp_path / "d.csv", INSTRUCTIONS)
    assert wheres(c) == [f"{c}:2", f"{c}:3", f"{c}:4"]
    p = write_parquet(tmp_path / "d.parquet", INSTRUCTIONS)
    assert wheres(p) == [f"{p}:row 0", f"{p}:row 1", f"{p}:row 2"]
    d = write_dataset_dir(tmp_path / "saved", INSTRUCTIONS)
    assert wheres(d) == [f"{d}:row 0", f"{d}:row 1", f"{d}:row 2"]


def test_csv_row_locations_count_multiline_cells(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text('text\n"two\nlines"\n""\n', encoding="utf-8")
    got = list(read_records(str(path)))
    assert got[0] == (f"{path}:2", {"text": "two\nlines"})
    assert got[1] == (f"{path}:4", {"text": ""})


def test_invalid_utf8_is_a_record_error_in_every_text_source(tmp_path):
    bad = "caf\udce9"  # what surrogateescape makes of the byte 0xE9
    (tmp_path / "b.csv").write_bytes(b"text\nfine\ncaf\xe9\n")
    (tmp_path / "b.json").write_bytes(b'[{"text": "fine"},\n {"text": "caf\xe9"}]')
    for name, line in (("b.csv", 3), ("b.json", 2)):
        records = list(read_records(str(tmp_path / name)))
        assert records[0][1] == {"text": "fine"}
        where, err = records[1]
        assert where == f"{tmp_path / name}:{line}" and isinstance(err, Exception) and str(err) == "invalid UTF-8"
    assert bad not in str(records)


def test_json_lines_saved_as_json(tmp_path):
    path = write_jsonl(tmp_path / "lines.json", INSTRUCTIONS)
    assert [w for w, _ in read_records(str(path))] == [f"{path}:1", f"{path}:2", f"{path}:3"]


def test_missing_file_names_the_path_and_the_fix(tok):
    with pytest.raises(DataError) as e:
        load_tokenized(DataConfig(train="nope/train.jsonl"), "train", tok, mask_prompt=True)
    assert "nope/train.jsonl: no such file" in e.value.message and ".jsonl" in e.value.fix


def test_unsupported_extension(tmp_path):
    (tmp_path / "d.txt").write_text("hello")
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        list(read_records(str(tmp_path / "d.txt")))


def test_broken_json_list_names_the_line(tmp_path):
    (tmp_path / "d.json").write_text('[\n{"text": "a"},\n{"text": }\n]')
    with pytest.raises(DataError, match=r"d.json:3: bad JSON"):
        list(read_records(str(tmp_path / "d.json")))


def test_dataset_dict_folder_asks_for_one_split(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list(INSTRUCTIONS)
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match="several splits") as e:
        list(read_records(str(tmp_path / "dd")))
    assert "dd/train" in e.value.fix


def test_plain_folder_is_refused(tmp_path):
    with pytest.raises(DataError, match="not one saved by datasets"):
        list(read_records(str(tmp_path)))
