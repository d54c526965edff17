"""dinrec.data: vocabularies, sample building, the sample store, batches, synthetic data.

The public API others code against::

    from dinrec.data import Schema, Feature, SequenceSpec          # the feature schema
    from dinrec.data import PrepareConfig, prepare_events, prepare_samples, SampleStore
    from dinrec.data import BatchLoader, Batch, SequenceBatch, Vocab, Vocabularies, SideTable
    from dinrec.data import SyntheticConfig, generate, preset
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

# Where each public name lives. Imported on first use (PEP 562), so that importing
# ``dinrec.data`` (as ``dinrec prepare --help`` does) does not pull in torch.
_WHERE = {
    "Batch": "batches", "BatchLoader": "batches", "SequenceBatch": "batches",
    "PrepareConfig": "samples", "SampleSet": "samples", "Sequences": "samples",
    "build_event_samples": "samples", "build_ready_samples": "samples",
    "Feature": "schema", "Schema": "schema", "SchemaError": "schema", "SequenceSpec": "schema",
    "SideTable": "sides",
    "SampleStore": "store", "prepare_events": "store", "prepare_samples": "store",
    "write_store": "store",
    "PRESETS": "synthetic", "GroundTruth": "synthetic", "SyntheticConfig": "synthetic",
    "generate": "synthetic", "preset": "synthetic",
    "OOV_ID": "vocab", "PAD_ID": "vocab", "Vocab": "vocab", "Vocabularies": "vocab",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'dinrec.data' has no attribute {name!r}")
    value = getattr(import_module(f"dinrec.data.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from dinrec.data.batches import Batch, BatchLoader, SequenceBatch
    from dinrec.data.samples import (
        PrepareConfig,
        SampleSet,
        Sequences,
        build_event_samples,
        build_ready_samples,
    )
    from dinrec.data.schema import Feature, Schema, SchemaError, SequenceSpec
    from dinrec.data.sides import SideTable
    from dinrec.data.store import SampleStore, prepare_events, prepare_samples, write_store
    from dinrec.data.synthetic import PRESETS, GroundTruth, SyntheticConfig, generate, preset
    from dinrec.data.vocab import OOV_ID, PAD_ID, Vocab, Vocabularies

__all__ = [
    "OOV_ID",
    "PAD_ID",
    "PRESETS",
    "Batch",
    "BatchLoader",
    "Feature",
    "GroundTruth",
    "PrepareConfig",
    "SampleSet",
    "SampleStore",
    "Schema",
    "SchemaError",
    "SequenceBatch",
    "SequenceSpec",
    "Sequences",
    "SideTable",
    "SyntheticConfig",
    "Vocab",
    "Vocabularies",
    "build_event_samples",
    "build_ready_samples",
    "generate",
    "prepare_events",
    "prepare_samples",
    "preset",
    "write_store",
]
