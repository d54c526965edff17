"""Glue of ``dinrec prepare``: a format name + input files + options -> a sample store.

    >>> from dinrec.data.prepare import prepare
    >>> report = prepare("movielens", ["ml-100k/u.data", "ml-100k/u.item"], "stores/ml100k")
    >>> report.stats["rows"]
    {'train': ..., 'valid': ..., 'test': ...}

The reader (:data:`dinrec.data.formats.FORMATS`) yields events or split samples; the data
core (:func:`~dinrec.data.prepare_events` / :func:`~dinrec.data.prepare_samples`) builds
and writes the store atomically, so a failed run leaves no output directory behind.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from dinrec.data.formats import FORMATS, ErrorLog, OnError, ReadOptions
from dinrec.data.schema import Schema
from dinrec.errors import DinrecError

log = logging.getLogger(__name__)


@dataclass
class PrepareReport:
    """What :func:`prepare` did."""

    format: str
    out_dir: Path
    stats: dict[str, Any]  # the store's stats.json
    records: int  # input records read
    events: int | None  # events handed to the core (None for split-sample formats)
    skipped: dict[str, int] = field(default_factory=dict)  # bad lines by reason
    examples: dict[str, str] = field(default_factory=dict)  # reason -> first file:line
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    read_seconds: float = 0.0


def prepare(
    fmt: str,
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    cfg: Any = None,
    options: ReadOptions | None = None,
    on_error: OnError = "fail",
    schema: Schema | None = None,
) -> PrepareReport:
    """Read ``inputs`` in format ``fmt`` and write a sample store at ``out_dir``.

    Args:
        fmt: a name in :data:`dinrec.data.formats.FORMATS` (``dien-text``, ``movielens``, ...).
        inputs: the input files (and folders, where the format takes them).
        out_dir: the store directory to create (an existing store there is replaced).
        cfg: a :class:`dinrec.data.PrepareConfig` (defaults when None).
        options: reader options (:class:`~dinrec.data.formats.ReadOptions`).
        on_error: ``"fail"``: raise :class:`~dinrec.errors.DataFormatError` at the first bad
            line; ``"skip"``: drop bad lines and count them in the report.
        schema: the features to prepare (:class:`~dinrec.data.schema.Schema`; default:
            ``Schema.default(cfg.max_len)``, today's user / item + cat / one history). The
            reader types and checks the columns it names; it is saved in the store.
    """
    from dinrec.data import PrepareConfig, prepare_events, prepare_samples

    if fmt not in FORMATS:
        raise DinrecError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    spec = FORMATS[fmt]
    cfg = cfg if cfg is not None else PrepareConfig()
    options = options if options is not None else ReadOptions()
    if schema is not None and options.schema is None:
        options = replace(options, schema=schema)
    schema = schema if schema is not None else options.schema
    paths = [Path(p) for p in inputs]
    if len(paths) < spec.min_inputs:
        raise DinrecError(f"format {fmt} needs inputs: {spec.inputs}")
    errors = ErrorLog(on_error)
    t0 = time.perf_counter()
    result = spec.read(paths, options, errors)
    t_read = time.perf_counter() - t0
    log.info("%s: read %d records in %.2fs", fmt, result.records, t_read)
    if result.events is not None:
        stats = prepare_events(result.events, out_dir, cfg, schema, items=result.items,
                               users=result.users)
        n_events: int | None = result.events.num_rows
    else:
        assert result.splits is not None
        stats = prepare_samples(result.splits, out_dir, cfg, schema)
        n_events = None
    return PrepareReport(
        format=fmt,
        out_dir=Path(out_dir),
        stats=stats,
        records=result.records,
        events=n_events,
        skipped=dict(errors.counts),
        examples=dict(errors.examples),
        notes=result.notes,
        seconds=time.perf_counter() - t0,
        read_seconds=t_read,
    )


def summary(report: PrepareReport) -> str:
    """A few human-readable lines describing a prepare run (the CLI prints them)."""
    s = report.stats
    rows = s.get("rows", {})
    lines = [
        f"prepared {report.format} -> {report.out_dir} in {report.seconds:.2f}s "
        f"(reading {report.read_seconds:.2f}s)",
        f"  input records: {report.records:,}"
        + (f"   events: {report.events:,}" if report.events is not None else ""),
        "  rows: " + ", ".join(f"{k} {v:,}" for k, v in rows.items()),
        f"  users: {s.get('users', 0):,}   items: {s.get('items', 0):,}   "
        + (f"categories: {s['categories']:,}   " if s.get("categories") else "")
        + "(vocabulary sizes, with <pad> and <oov>)",
    ]
    sizes = s.get("table_sizes", {})
    other = {k: v for k, v in sizes.items() if k not in ("user", "item", "cat")}
    if other:
        lines.append("  other tables: " + ", ".join(f"{k} {v:,}" for k, v in other.items()))
    seqs = s.get("sequences", {})
    if len(seqs) > 1:
        lines.append("  sequences: " + ", ".join(f"{k} {v['ids']:,} events" for k, v in seqs.items()))
    for note in report.notes:
        lines.append(f"  {note}")
    if report.skipped:
        total = sum(report.skipped.values())
        lines.append(f"  skipped {total:,} bad line(s):")
        for reason, n in sorted(report.skipped.items(), key=lambda kv: -kv[1]):
            lines.append(f"    {n:>8,}  {reason}  (first at {report.examples.get(reason, '?')})")
    else:
        lines.append("  skipped lines: 0")
    return "\n".join(lines)
