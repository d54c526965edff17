"""The one setting that chooses how dinrec's layers compute: ``"fast"`` or ``"reference"``.

Every operation with a fast path has exactly two implementations:

* ``"reference"`` -- the literal math in plain PyTorch ops (the TensorFlow reference's
  attention line by line, the GRU cells step by step, ``nn.GRU`` for the interest
  extractor). Any device, any dtype, autograd, and every exporter (ONNX, TorchScript)
  sees only standard ops. Tests compare the fast path against it.
* ``"fast"`` (the default) -- the folded attention algebra in PyTorch ops, and on CPU
  for float32 / float64 the C++ operators of :mod:`dinrec.nn._ops` (the GRU recurrence,
  candidate scoring). Where a C++ operator cannot run (another device or dtype, or no
  build: one warning says so) the reference computes that operation, and likewise where
  it was timed at first use and found no faster than the torch path on this CPU at this
  thread count (one log line says so; ``dinrec.nn._ops.fast_paths()`` reports).

Choose it per block with the context manager (it applies to this thread)::

    with dinrec.nn.backend("reference"):
        logits = model(batch)

A module or function argument ``impl="reference"`` pins one unit to the reference;
``impl="fast"`` (the default) follows this setting.

A second, narrower setting, :func:`products` (:data:`Products`), chooses the precision of
the matrix products of the fused attention / auxiliary MLP (``dinrec::offset_mlp``):
``"float32"`` (the default outside training), ``"bfloat16"`` operands with float32
accumulation, or ``"auto"``: bfloat16 where this CPU has a checked bfloat16 kernel that
was measured faster, float32 elsewhere, silently. Training sets it from
``TrainConfig.mlp_products`` (``dinrec train --mlp-products``, default ``auto``).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Literal, get_args

import torch

__all__ = ["Backend", "Products", "backend", "get_backend", "get_products", "products"]

Backend = Literal["reference", "fast"]
_BACKENDS: tuple[str, ...] = get_args(Backend)
#: The precision of the matrix products of the fused attention / auxiliary MLP
#: (``dinrec::offset_mlp``, float32 models on the CPU): ``"float32"`` (the default), or
#: ``"bfloat16"``: bfloat16 operands with float32 accumulation (about 2x faster products
#: on CPUs with AVX512-BF16 or AMX; elementwise work, gradients sums and weights stay float32),
#: or ``"auto"``: bfloat16 where it is available and measured faster here, else float32.
Products = Literal["float32", "bfloat16", "auto"]
_PRODUCTS: tuple[str, ...] = get_args(Products)


class _State(threading.local):
    name: Backend = "fast"
    products: Products = "float32"


_state = _State()


def get_backend() -> Backend:
    """The backend in force on this thread (``"fast"`` unless inside :func:`backend`)."""
    return _state.name


@contextlib.contextmanager
def backend(name: Backend) -> Iterator[None]:
    """Run the block with ``name`` (``"reference"`` or ``"fast"``) on this thread."""
    if name not in _BACKENDS:
        raise ValueError(f"backend: expected one of {', '.join(_BACKENDS)}, got {name!r}")
    previous = _state.name
    _state.name = name
    try:
        yield
    finally:
        _state.name = previous


def get_products() -> Products:
    """The :data:`Products` in force on this thread (``"float32"`` unless inside :func:`products`)."""
    return _state.products


@contextlib.contextmanager
def products(name: Products) -> Iterator[None]:
    """Run the block with the fused MLP's matrix products in ``name`` (:data:`Products`) on
    this thread; a layer's backward uses what its forward used."""
    if name not in _PRODUCTS:
        raise ValueError(f"products: expected one of {', '.join(_PRODUCTS)}, got {name!r}")
    previous = _state.products
    _state.products = name
    try:
        yield
    finally:
        _state.products = previous


def resolve(impl: str | None) -> Backend:
    """A unit's ``impl`` argument (``"fast"``/``None``: follow the setting; ``"reference"``:
    pinned) -> the implementation to run."""
    if impl == "reference":
        return "reference"
    if impl not in (None, "fast"):
        raise ValueError(f"impl: expected 'fast' or 'reference', got {impl!r}")
    return _state.name


def tracing() -> bool:
    """Whether a tracer or compiler (torch.compile, torch.export, TorchScript) is running:
    shapes then stay symbolic, so no data-dependent step counts."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting()
