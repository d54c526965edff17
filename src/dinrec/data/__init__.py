"""dinrec.data: vocabularies, sample building, the sample store, batches, synthetic data.

The public API others code against::

    from dinrec.data import Schema, Feature, SequenceSpec          # the feature schema
    from dinrec.data import PrepareConfig, prepare_events, prepare_samples, SampleStore
    from dinrec.data import BatchLoader, Batch, SequenceBatch, Vocab, Vocabularies, SideTable
    from dinrec.data import SyntheticConfig, generate, preset
"""

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
