"""Readers and the feature schema: side tables, extra event columns, typed columns, bad input."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dinrec.data.schema import Schema
from dinrec.errors import DataFormatError
from test_formats_common import FIX, read_with, write

RICH = FIX / "events-rich"
RICH_OPTS = dict(user_col="user_id", item_col="item_id", time_col="time")


def _rows(table: pa.Table) -> list[dict]:
    return table.to_pylist()


def _schema(**d) -> Schema:
    return Schema.from_dict(d)


def _by(table: pa.Table, key: str) -> dict[str, dict]:
    return {r[key]: r for r in table.to_pylist()}


# --------------------------------------------------------------------- events + side tables
def test_events_keep_every_extra_column():
    result, _ = read_with("events", [RICH / "log.csv"], **RICH_OPTS)
    ev = result.events
    assert ev.column_names == ["user", "item", "ts", "behaviour", "platform", "hour"]
    assert ev.column("behaviour").to_pylist()[:3] == ["click", "cart", "buy"]
    assert ev.schema.field("hour").type == pa.string()  # untyped without a schema
    assert result.items is None and result.users is None


@pytest.mark.parametrize("name", ["items.jsonl", "items.tsv"])
def test_item_table_json_lines_or_tsv(name):
    schema = _schema(item=["item", {"name": "brand"}, {"name": "price", "kind": "numeric"},
                           {"name": "categories", "kind": "multi"}])
    result, _ = read_with("events", [RICH / "log.csv"], item_table=RICH / name,
                          schema=schema, **RICH_OPTS)
    items = _by(result.items, "item")
    assert result.items.column_names[0] == "item" and "item_id" not in result.items.column_names
    assert result.items.schema.field("price").type == pa.float64()
    assert result.items.schema.field("categories").type == pa.list_(pa.string())
    assert items["i1"]["price"] == 12.99 and items["i2"]["price"] == 3.5
    assert items["i4"]["price"] is None  # empty / null = missing
    assert items["i3"]["categories"] == ["Beauty", "Tools", "Brushes"]  # nested paths flattened
    assert items["i4"]["categories"] == []
    assert items["i1"]["brand"] == "Acme" and items["i4"]["brand"] in (None, "")
    assert result.sources["items"] == str(RICH / name)


def test_user_table_and_parquet_log(tmp_path):
    csv = read_with("events", [RICH / "log.csv"], **RICH_OPTS)[0].events
    pq.write_table(pa.table({"user_id": csv.column("user"), "item_id": csv.column("item"),
                             "time": csv.column("ts"),
                             "tags": pa.array([["a", "b"]] * csv.num_rows)}),
                   tmp_path / "log.parquet")
    schema = _schema(user=["user", {"name": "age", "kind": "numeric"}, "segment"])
    result, _ = read_with("events", [tmp_path / "log.parquet"], user_table=RICH / "users.csv",
                          schema=schema, **RICH_OPTS)
    users = _by(result.users, "user")
    assert users["u3"] == {"user": "u3", "age": 52.0, "gender": "F", "segment": "gold"}
    assert result.events.column("ts").equals(csv.column("ts"))
    assert result.events.column("tags").type == pa.list_(pa.string())  # Parquet lists kept


def test_schema_types_event_columns_and_numeric_filters():
    schema = _schema(context=[{"name": "hour", "kind": "numeric"}],
                     sequences=[{"name": "buys", "filter_column": "behaviour",
                                 "values": ["buy"]},
                                {"name": "early", "filter_column": "time",
                                 "values": ["<1600000200"]}])
    result, _ = read_with("events", [RICH / "log.csv"], schema=schema,
                          **{**RICH_OPTS, "time_col": None})
    ev = result.events
    assert ev.schema.field("hour").type == pa.float64()
    assert ev.schema.field("time").type == pa.float64()  # a bounded filter: numbers
    assert ev.schema.field("behaviour").type == pa.string()


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        (dict(item=["item", "brandd"]), "log.csv: brandd: no such column for feature 'brandd'"),
        (dict(context=["weekday"]), "log.csv: weekday: no such column"),
        (dict(sequences=[{"name": "s", "filter_column": "kind", "values": ["x"]}]),
         "log.csv: kind: no such column for sequence filter"),
        (dict(user=["user", "segment"]), "log.csv: segment: no such column"),
    ],
)
def test_schema_naming_a_missing_column(schema, message):
    with pytest.raises(DataFormatError) as exc:
        read_with("events", [RICH / "log.csv"], schema=_schema(**schema), **RICH_OPTS)
    assert str(exc.value).startswith(str(RICH / "log.csv")) and message in str(exc.value)


def test_non_numeric_value_in_a_numeric_feature(tmp_path):
    text = (RICH / "log.csv").read_text().replace("u2,i4,1600000150,click,android,12",
                                                  "u2,i4,1600000150,click,android,noon")
    path = write(tmp_path / "log.csv", text)
    schema = _schema(context=[{"name": "hour", "kind": "numeric"}])
    with pytest.raises(DataFormatError) as exc:
        read_with("events", [path], schema=schema, **RICH_OPTS)
    assert str(exc.value) == f"{path}:7: hour: not a number"
    result, errors = read_with("events", [path], on_error="skip", schema=schema, **RICH_OPTS)
    assert result.events.num_rows == 11 and errors.skipped == 1
    # the same value in an item table
    items = write(tmp_path / "items.tsv", (RICH / "items.tsv").read_text().replace("3.50", "1e999"))
    with pytest.raises(DataFormatError, match=rf"^{items}:3: price: out of range$"):
        read_with("events", [RICH / "log.csv"], item_table=items, **RICH_OPTS,
                  schema=_schema(item=["item", {"name": "price", "kind": "numeric"}]))


def test_numeric_feature_on_the_category_column():
    schema = _schema(item=["item", {"name": "cat", "kind": "numeric"}])
    with pytest.raises(DataFormatError, match=r"seq.txt: cat: is string, not numbers"):
        read_with("sequences", [FIX / "sequences" / "seq.txt"], schema=schema)
    read_with("events", [RICH / "log.csv"], schema=schema, **RICH_OPTS)  # no cat: "unknown"


def test_list_column_read_as_categorical_or_numeric():
    with pytest.raises(DataFormatError, match="categories: holds lists: declare feature"):
        read_with("events", [RICH / "log.csv"], item_table=RICH / "items.jsonl", **RICH_OPTS,
                  schema=_schema(item=["item", "categories"]))
    with pytest.raises(DataFormatError, match=r"items.jsonl:1: categories: a list, not one number"):
        read_with("events", [RICH / "log.csv"], item_table=RICH / "items.jsonl", **RICH_OPTS,
                  schema=_schema(item=["item", {"name": "categories", "kind": "numeric"}]))


def test_filter_on_a_column_split_into_lists():
    """A multi feature and a text sequence filter on one column (a fuzz find: the core's
    filter then met lists): one line naming the column."""
    schema = _schema(context=[{"name": "b", "column": "behaviour", "kind": "multi"}],
                     sequences=[{"name": "s", "filter_column": "behaviour", "values": ["buy"]}])
    with pytest.raises(DataFormatError, match=r"log.csv: behaviour: holds lists .* filter"):
        read_with("events", [RICH / "log.csv"], schema=schema, **RICH_OPTS)


def test_side_table_duplicate_and_empty_keys(tmp_path):
    dup = write(tmp_path / "items.tsv", (RICH / "items.tsv").read_text() + "i2\tOther\t1\tX\n")
    with pytest.raises(DataFormatError, match=rf"^{dup}:7: item_id: duplicate key"):
        read_with("events", [RICH / "log.csv"], item_table=dup, **RICH_OPTS)
    empty = write(tmp_path / "users.csv", "user_id,age\n,5\nu1,3\n")
    with pytest.raises(DataFormatError, match=rf"^{empty}:2: user_id: empty"):
        read_with("events", [RICH / "log.csv"], user_table=empty, **RICH_OPTS)
    with pytest.raises(DataFormatError, match=rf"^{RICH / 'users.csv'}:1: uid: no such column"):
        read_with("events", [RICH / "log.csv"], user_table=RICH / "users.csv", user_key="uid",
                  **RICH_OPTS)


# --------------------------------------------------------------------- movielens
@pytest.mark.parametrize("folder", ["ml-1m", "ml-100k"])
def test_movielens_users_genres_and_ratings(folder):
    result, _ = read_with("movielens", [FIX / folder])
    users = _by(result.users, "user")
    assert result.users.column_names == ["user", "gender", "age", "occupation", "zip",
                                         "zip_prefix"]
    if folder == "ml-1m":
        assert users["1"] == {"user": "1", "gender": "F", "age": "1", "occupation": "10",
                              "zip": "48067", "zip_prefix": "480"}
    else:
        assert users["4"]["zip_prefix"] == "T8H" and users["2"]["age"] == "53"
    items = _by(result.items, "item")
    first = next(iter(items.values()))
    assert first["genres"][0] == first["cat"] and len(first["genres"]) == 3
    assert result.events.column("rating").type == pa.float64()
    assert result.events.column("rating").to_pylist()[:2] == [5.0, 3.0]
    # the events' category is the first genre, as before the schema
    cats = dict(zip(result.events.column("item").to_pylist(),
                    result.events.column("cat").to_pylist(), strict=True))
    assert all(cats[i] == items[i]["cat"] for i in cats if i in items)


def test_movielens_user_age_as_numeric_and_bad_age(tmp_path):
    schema = _schema(user=["user", {"name": "age", "kind": "numeric"}, "gender"])
    result, _ = read_with("movielens", [FIX / "ml-100k"], schema=schema)
    assert result.users.column("age").to_pylist() == [24.0, 53.0, 23.0, 24.0]
    users = write(tmp_path / "u.user", "1|24|M|technician|85711\n2|old|F|other|94043\n")
    with pytest.raises(DataFormatError, match=rf"^{users}:2: age: not a number$"):
        read_with("movielens", [FIX / "ml-100k" / "u.data", users], schema=schema)


def test_movielens_users_file_errors(tmp_path):
    bad = write(tmp_path / "users.dat", "1::F::1::10::48067\n2::M::56\n")
    with pytest.raises(DataFormatError, match=rf"^{bad}:2: expected 5 fields, got 3"):
        read_with("movielens", [FIX / "ml-1m" / "ratings.dat", bad])


# --------------------------------------------------------------------- sequences, amazon
def test_sequences_all_attributes():
    result, _ = read_with("sequences", [FIX / "sequences" / "seq.txt",
                                        FIX / "sequences" / "attrs.json"])
    items = _by(result.items, "item")
    assert items["3"] == {"item": "3", "cat": "10", "attrs": ["10", "30", "31"]}
    assert items["4"] == {"item": "4", "cat": "unknown", "attrs": []}
    assert result.events.column_names == ["user", "item", "cat"]


def test_amazon_meta_2014_and_2018():
    reviews = FIX / "amazon" / "reviews.json"
    for meta in ("meta.json", "meta2018.json"):
        result, _ = read_with("amazon", [reviews, FIX / "amazon" / meta])
        items = _by(result.items, "item")
        assert items["P1"]["categories"] == ["Books", "Fiction", "Mystery"]
        assert items["P1"]["cat"] == "Mystery" and items["P4"]["cat"] == "unknown"
        assert result.events.column("rating").to_pylist()[0] == 5.0
    assert items["P1"]["brand"] == "Penguin" and items["P2"]["brand"] is None
    assert items["P1"]["price"] == 12.99 and items["P2"]["price"] == 1299.0
    assert items["P3"]["price"] is None  # a price range is not one number
    schema = _schema(item=["item", "main_cat", {"name": "categories", "kind": "multi"}])
    result, _ = read_with("amazon", [reviews, FIX / "amazon" / "meta2018.json"], schema=schema)
    assert _by(result.items, "item")["P2"]["main_cat"] == "Music"


def test_split_formats_carry_only_the_default_columns():
    schema = _schema(item=["item", "cat", "brand"])
    with pytest.raises(DataFormatError, match="brand: no such column .*split-sample formats"):
        read_with("dien-text", [FIX / "dien" / "local_train", FIX / "dien" / "local_test"],
                  schema=schema)
    read_with("dien-text", [FIX / "dien" / "local_train", FIX / "dien" / "local_test"],
              schema=Schema.default())
