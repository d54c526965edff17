"""docs/formats.md: every schema example is a valid schema, and the events one prepares."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dinrec.data.formats import ReadOptions
from dinrec.data.prepare import prepare
from dinrec.data.schema import Schema
from test_formats_common import FIX

DOC = Path(__file__).resolve().parent.parent / "docs" / "formats.md"


def doc_schemas() -> dict[str, Schema]:
    """Heading (### ...) -> the schema in the first ```json block under it."""
    text = DOC.read_text()
    out = {}
    for m in re.finditer(r"^### (.+?)$(.*?)(?=^##)", text, re.S | re.M):
        block = re.search(r"```json\n(.*?)```", m.group(2), re.S)
        if block and not block.group(1).lstrip().startswith('{"name"'):  # not a fragment
            out[m.group(1).strip()] = Schema.from_json(block.group(1), where=m.group(1))
    return out


def test_every_schema_example_parses():
    schemas = doc_schemas()
    assert len(schemas) >= 5, list(schemas)
    assert any(t.startswith("A complete example") for t in schemas)  # the reference chapter
    assert any(len(s.sequences) == 2 for s in schemas.values())  # liked / disliked


def test_the_events_example_prepares_from_the_fixtures(tmp_path):
    schema = next(s for title, s in doc_schemas().items() if title.startswith("An events log"))
    rich = FIX / "events-rich"
    options = ReadOptions(user_col="user_id", item_col="item_id", time_col="time",
                          item_table=rich / "items.jsonl", user_table=rich / "users.csv")
    report = prepare("events", [rich / "log.csv"], tmp_path / "s", options=options,
                     schema=schema)
    assert (tmp_path / "s" / "schema.json").exists()
    assert Schema.load(tmp_path / "s") == schema
    assert report.events == 12


@pytest.mark.parametrize("name", ["ML-1M", "Amazon Beauty"])
def test_the_other_examples_read_the_fixtures(name):
    from test_formats_common import read_with

    schema = next(s for title, s in doc_schemas().items() if title.startswith(name))
    if name == "ML-1M":
        read_with("movielens", [FIX / "ml-1m"], schema=schema)
    else:
        read_with("sequences", [FIX / "sequences" / "seq.txt", FIX / "sequences" / "attrs.json"],
                  schema=schema)
