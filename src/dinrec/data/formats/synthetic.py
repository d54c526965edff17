"""``synthetic``: the embedded synthetic dataset (:mod:`dinrec.data.synthetic`), no inputs.

``preset`` names a :mod:`dinrec.data.synthetic` preset (e.g. ``small``); the events carry
user, item, category and time, and the planted ground truth is not part of the store.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from dinrec.data.formats import Format, ReadOptions, ReadResult
from dinrec.data.formats.common import ErrorLog
from dinrec.errors import DinrecError


def read(inputs: Sequence[Path], options: ReadOptions, errors: ErrorLog) -> ReadResult:
    if inputs:
        raise DinrecError("the synthetic format takes no input files (use --preset)")
    from dinrec.data import synthetic

    events, _truth = synthetic.generate(synthetic.preset(options.preset))
    return ReadResult(events=events, records=events.num_rows,
                      notes=[f"synthetic preset {options.preset!r}"])


FORMAT = Format(
    name="synthetic",
    reader=read,
    summary="the embedded synthetic dataset (--preset NAME), no input files",
    inputs="(none)",
    min_inputs=0,
)
