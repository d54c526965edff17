"""dinrec.serve: rank and explain with a run (:class:`Ranker`), HTTP service (``app``), export.

``Ranker`` needs only the core install; ``dinrec.serve.app`` (FastAPI, uvicorn) and the
ONNX parts of ``dinrec.serve.export`` need the ``serve`` extra.
"""

from dinrec.serve.ranker import (
    CandidateScores,
    Explanation,
    Ranker,
    Recommendation,
    RowScores,
    Scored,
)

__all__ = ["CandidateScores", "Explanation", "Ranker", "Recommendation", "RowScores", "Scored"]
