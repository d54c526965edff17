"""The C++ operators (dinrec/nn/_ops.py, dinrec/csrc): registration (schema, fake
implementation, autograd), the self-check's reach (a kernel broken on any one path is
rejected), the fallback when the check fails or raises, and dispatch off the CPU."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from dinrec.nn import _ops, backend, get_backend
from dinrec.nn.attention import DinFcnAttention
from dinrec.nn.rnn import AUGRU, InterestExtractor, attention_gru

needs_build = pytest.mark.skipif(not _ops.available(), reason="no C++ build of the kernels")


def _gru_args(t=5, b=6, h=7, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    xi, w, bias, h0 = (torch.randn(*s, generator=g, dtype=dtype) for s in ((t, b, 3 * h), (3 * h, h), (3 * h,), (b, h)))
    c0 = torch.rand(t, b, generator=g, dtype=dtype)
    c1 = -c0 * torch.rand(t, b, generator=g, dtype=dtype)
    return xi, c0, c1, w * 0.5, bias, h0


def _cand_args(n=9, t=7, d=5, a=6, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = ((n, d), (t, d), (a, d), (a, d), (a, d), (a,), (40, a), (40,), (1, 40), (1,))
    return tuple(torch.randn(*s, generator=g, dtype=dtype) * 0.5 for s in shapes)


# --------------------------------------------------------------------------- registration
@needs_build
def test_opcheck_gru_scan():
    """Schema, fake (meta) implementation, autograd registration, and AOT dispatch."""
    args = [x.requires_grad_() for x in _gru_args()]
    torch.library.opcheck(_ops.gru_scan, args)
    torch.library.opcheck(_ops.gru_scan, [x.detach() for x in args])


@needs_build
def test_opcheck_candidate_scores():
    torch.library.opcheck(_ops.candidate_scores, _cand_args())


@needs_build
def test_gru_scan_gradcheck_against_finite_differences():
    args = [x.requires_grad_() for x in _gru_args(t=4, b=3, h=5)]
    assert torch.autograd.gradcheck(lambda *a: _ops.gru_scan(*a)[0], args, eps=1e-6, atol=1e-6)


@needs_build
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gru_scan_equals_its_reference(dtype):
    tol = 2e-5 if dtype == torch.float32 else 1e-10
    args = _gru_args(t=30, b=40, h=36, dtype=dtype)
    for got, want in zip(_ops.gru_scan(*args), _ops.gru_scan_reference(*args), strict=True):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def _packed_args(lengths=(5, 5, 4, 2, 2, 1), h=7, dtype=torch.float64, seed=0):
    """gru_scan_packed's arguments for rows of ``lengths`` (sorted, longest first)."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.tensor(lengths)
    sizes = (torch.arange(int(lens[0]))[:, None] < lens).sum(1)  # (S,)
    n = int(lens.sum())
    xi, w, bias, h0 = (torch.randn(*s, generator=g, dtype=dtype) for s in ((n, 3 * h), (3 * h, h), (3 * h,), (len(lengths), h)))
    c0 = torch.rand(n, generator=g, dtype=dtype)
    c1 = -c0 * torch.rand(n, generator=g, dtype=dtype)
    return xi, c0, c1, w * 0.5, bias, h0, sizes


@needs_build
def test_opcheck_gru_scan_packed():
    *args, sizes = _packed_args()
    args = [x.requires_grad_() for x in args]
    torch.library.opcheck(_ops.gru_scan_packed, [*args, sizes])
    torch.library.opcheck(_ops.gru_scan_packed, [*(x.detach() for x in args), sizes])


@needs_build
def test_gru_scan_packed_gradcheck_against_finite_differences():
    *args, sizes = _packed_args(lengths=(4, 2, 2, 1), h=5)
    args = [x.requires_grad_() for x in args]
    assert torch.autograd.gradcheck(lambda *a: _ops.gru_scan_packed(*a, sizes)[0], args, eps=1e-6, atol=1e-6)


@needs_build
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gru_scan_packed_equals_its_reference_and_the_dense_scan(dtype, threads):
    """Values and every gradient against the packed reference loop; the states also against
    the dense scan with the padded steps' fraction 0 (rows ending inside each thread's block)."""
    tol = 2e-5 if dtype == torch.float32 else 1e-10
    g = torch.Generator().manual_seed(3)
    lengths = sorted(torch.randint(1, 30, (70,), generator=g).tolist(), reverse=True)
    *args, sizes = _packed_args(lengths=lengths, h=36, dtype=dtype)
    leaves = [x.clone().requires_grad_() for x in args]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = _ops.gru_scan_packed(*leaves, sizes)
        g_hs = torch.randn(got[0].shape, generator=g, dtype=dtype)
        got_grads = torch.autograd.grad(got[0], leaves, g_hs)
    finally:
        torch.set_num_threads(previous)
    ref_leaves = [x.clone().requires_grad_() for x in args]
    want = _ops.gru_scan_packed_reference(*ref_leaves, sizes)
    want_grads = torch.autograd.grad(want[0], ref_leaves, g_hs)
    for a, b in zip([*got, *got_grads], [*want, *want_grads], strict=True):
        torch.testing.assert_close(a, b, rtol=tol * 10, atol=tol * 10)
    # the dense scan over (S, B): packed position (t, i) <-> dense (t, i), f = 0 where i >= sizes[t]
    xi, c0, c1, w, bias, h0 = args
    steps, b = len(sizes), len(lengths)
    running = torch.arange(b)[None] < sizes[:, None]  # (S, B)
    dense = [torch.zeros(steps, b, *x.shape[1:], dtype=dtype) for x in (xi, c0, c1)]
    for d, x in zip(dense, (xi, c0, c1), strict=True):
        d[running] = x
    hs, _ = _ops.gru_scan(*dense, w, bias, h0)
    torch.testing.assert_close(got[0], hs[running], rtol=tol, atol=tol)


@needs_build
def test_gru_scan_packed_rejects_a_bad_layout():
    *args, sizes = _packed_args()
    for bad in (sizes.flip(0), sizes + 1, sizes.int()):
        with pytest.raises(RuntimeError, match="batch_sizes"):
            _ops.gru_scan_packed(*args, bad)


def test_fake_tensors_give_shapes_without_running_a_kernel():
    with FakeTensorMode():
        xi, c0, c1, w, b, h0 = (torch.empty(s) for s in ((4, 3, 15), (4, 3), (4, 3), (15, 5), (15,), (3, 5)))
        hs, gates = _ops.gru_scan(xi, c0, c1, w, b, h0)
        assert hs.shape == (4, 3, 5) and gates.shape == (4, 3, 20)
        d = _ops.gru_scan_backward(hs, hs, gates, c0, c1, w, h0)
        assert [x.shape for x in d] == [(4, 3, 20), (4, 3), (4, 3), (3, 5)]
        hs, gates = _ops.gru_scan_packed(xi[0], c0[0], c0[0], w, b, h0, torch.ones(1, dtype=torch.int64) * 3)
        assert hs.shape == (3, 5) and gates.shape == (3, 25)
        d = _ops.gru_scan_packed_backward(hs, gates, c0[0], c0[0], w, h0, torch.ones(1, dtype=torch.int64) * 3)
        assert [x.shape for x in d] == [(3, 20), (3,), (3,), (3, 5)]
        s = _ops.candidate_scores(*(torch.empty(x.shape) for x in _cand_args(n=11, t=13)))
        assert s.shape == (11, 13)


def test_layers_on_the_meta_device_dispatch_to_the_reference():
    """Off the CPU (meta here, CUDA alike) the fast backend runs the reference ops: the
    layers trace shapes without data and without a C++ kernel."""
    b, t, e, h = 4, 6, 5, 7
    x = torch.empty(b, t, e, device="meta")
    mask = torch.ones(b, t, dtype=torch.bool, device="meta")
    a = torch.empty(b, t, device="meta")
    assert get_backend() == "fast"
    out, final = AUGRU(e, h).to("meta")(x, a, mask)
    assert out.shape == (b, t, h) and final.shape == (b, h) and out.device.type == "meta"
    out, final = InterestExtractor(e, h).to("meta")(x, mask)
    assert out.shape == (b, t, h) and final.shape == (b, h)
    att = DinFcnAttention(3, e, 8).to("meta")
    assert att(torch.empty(b, 3, device="meta"), x, mask).shape == (b, 1, e)
    with torch.no_grad():
        y = att.score_candidates(torch.empty(9, 3, device="meta"), x[0], mask[0])
    assert y.shape == (9, 1, e)


# --------------------------------------------------------------------------- self-check reach
def _broken(name: str, region):
    """The real kernel ``name`` with 1e-3 added to the part of its first output that
    ``region(output) -> view`` selects (and only when that part exists)."""
    real = _ops.CHECKED[name]

    def kernel(*args):
        out = real(*args)
        first = out[0] if isinstance(out, tuple) else out
        first = first.clone()
        part = region(first)
        if part.numel():
            part += 1e-3
        return (first, *out[1:]) if isinstance(out, tuple) else first

    return kernel


BREAKS = {
    # GRU forward: the 16-lane main loop, its packed tail, the second thread's rows, float64 only
    "gru main loop": ("gru_forward", lambda hs: hs[..., :16]),
    "gru tail": ("gru_forward", lambda hs: hs[..., 32:] if hs.shape[-1] == 36 else hs[..., :0]),
    "gru second thread": ("gru_forward", lambda hs: hs[:, hs.shape[1] // 2 + 1 :]),
    "gru float64": ("gru_forward", lambda hs: hs if hs.dtype == torch.float64 else hs[:0]),
    "gru backward tail": ("gru_backward", lambda d: d[..., 35:36] if d.shape[-1] == 144 else d[..., :0]),
    "gru backward float32": ("gru_backward", lambda d: d if d.dtype == torch.float32 else d[:0]),
    # packed GRU: the last step's rows, the tail columns, the backward's d x_n block
    "gru packed last step": ("gru_packed_forward", lambda hs: hs[-1:]),
    "gru packed tail": ("gru_packed_forward", lambda hs: hs[:, 32:] if hs.shape[-1] == 36 else hs[:, :0]),
    "gru packed backward d_xn": ("gru_packed_backward", lambda d: d[:, 2 * d.shape[1] // 4 : 3 * d.shape[1] // 4]),
    # candidates: only the threaded split (large N), only its second half, only the last positions
    "candidates split": ("candidate_scores", lambda s: s if s.shape[0] >= 1000 else s[:0]),
    "candidates second half": ("candidate_scores", lambda s: s[s.shape[0] // 2 + 1 :]),
    "candidates float64": ("candidate_scores", lambda s: s if s.dtype == torch.float64 else s[:0]),
    "candidates last position": ("candidate_scores", lambda s: s[:, -1:]),
    # offset MLP: the last (short) tile, float64 only, the backward's input gradient of the last tile
    "offset mlp last tile": ("offset_mlp_forward", lambda s: s[1024:]),
    "offset mlp float64": ("offset_mlp_forward", lambda s: s if s.dtype == torch.float64 else s[:0]),
    "offset mlp one tile": ("offset_mlp_forward", lambda s: s if s.shape[0] < 10 else s[:0]),
    "offset mlp backward last tile": ("offset_mlp_backward", lambda g_x: g_x[1024:]),
}


@needs_build
@pytest.mark.parametrize("case", list(BREAKS))
def test_self_check_rejects_a_kernel_broken_on_one_path(monkeypatch, case):
    name, region = BREAKS[case]
    _ops.self_check()  # the real kernels pass
    monkeypatch.setitem(_ops.CHECKED, name, _broken(name, region))
    with pytest.raises(AssertionError, match="differs from the reference"):
        _ops.self_check()


@needs_build
@pytest.mark.parametrize("failure", ["wrong", "raises"])
def test_a_failing_self_check_falls_back_with_one_warning(monkeypatch, failure):
    """A wrong or raising kernel: available() is False after one warning, and the layers
    give the reference's values instead of crashing."""
    def raising(*args):
        raise RuntimeError("kernel crashed")

    bad = _broken("gru_forward", lambda hs: hs) if failure == "wrong" else raising
    monkeypatch.setitem(_ops.CHECKED, "gru_forward", bad)
    _ops.available.cache_clear()
    try:
        x = torch.randn(3, 5, 4, dtype=torch.float64)
        a = torch.rand(3, 5, dtype=torch.float64)
        mask = torch.arange(5)[None] < torch.tensor([5, 2, 0])[:, None]
        unit = AUGRU(4, 6).double()
        with pytest.warns(RuntimeWarning, match="self-check.*pure-PyTorch") as record:
            out = unit(x, a, mask)
            unit(x, a, mask)
        assert len(record) == 1
        assert not _ops.available()
        with backend("reference"):
            torch.testing.assert_close(out, unit(x, a, mask))
    finally:
        _ops.available.cache_clear()


# --------------------------------------------------------------------------- the setting
def test_backend_setting_is_scoped_and_checked():
    assert get_backend() == "fast"
    with backend("reference"):
        assert get_backend() == "reference"
        with backend("fast"):
            assert get_backend() == "fast"
        assert get_backend() == "reference"
    assert get_backend() == "fast"
    with pytest.raises(ValueError, match="backend"):
        with backend("c"):  # type: ignore[arg-type]
            pass
    with pytest.raises(ValueError, match="impl"):
        attention_gru(torch.zeros(1, 2, 3), torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool),
                      AUGRU(3, 4).weights(), impl="c")


@needs_build
def test_no_thread_count_changes_inside_forward_or_backward(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.append(n))
    x = torch.randn(40, 30, 8, requires_grad=True)
    mask = torch.ones(40, 30, dtype=torch.bool)
    out, final = AUGRU(8, 36)(x, torch.rand(40, 30), mask)
    (out.sum() + final.sum()).backward()
    with torch.no_grad():
        DinFcnAttention(8, 8, 16).score_candidates(torch.randn(1000, 8), torch.randn(100, 8))
    assert calls == []


# --------------------------------------------------------------------------- measured choice
@pytest.fixture
def fresh_choice(monkeypatch, tmp_path):
    """No decision made yet in this process, the disk cache in ``tmp_path``."""
    monkeypatch.setattr(_ops, "_choices", {})
    monkeypatch.setattr(_ops, "build_folder", tmp_path)
    return tmp_path


def _timings(cpp_s: float, torch_s: float, calls: list | None = None):
    def measure(op):
        if calls is not None:
            calls.append((op, torch.get_num_threads()))
        return cpp_s, torch_s
    return measure


def _spy_op(monkeypatch, name):
    """Count calls of ``_ops.<name>`` (the C++ operator's Python entry); for ``gru_scan``
    also of its packed form (the layers run it on padded batches)."""
    ran = []
    for each in (name, "gru_scan_packed") if name == "gru_scan" else (name,):
        real = getattr(_ops, each)
        monkeypatch.setattr(_ops, each, lambda *a, real=real: ran.append(1) or real(*a))
    return ran


def _augru_case():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, 5, generator=g)
    a = torch.rand(4, 6, generator=g)
    mask = torch.arange(6)[None] < torch.tensor([6, 3, 1, 5])[:, None]
    return AUGRU(5, 36), x, a, mask


@needs_build
def test_measured_faster_the_cpp_operators_run(monkeypatch, fresh_choice):
    monkeypatch.setattr(_ops, "measure", _timings(0.010, 0.020))
    assert _ops.use("candidate_scores") and _ops.use("gru_scan")
    ran_cs, ran_gru = _spy_op(monkeypatch, "candidate_scores"), _spy_op(monkeypatch, "gru_scan")
    with torch.no_grad():
        DinFcnAttention(8, 8, 16).score_candidates(torch.randn(50, 8), torch.randn(20, 8))
    unit, x, a, mask = _augru_case()
    unit(x, a, mask)
    assert ran_cs and ran_gru
    c = _ops.choice("candidate_scores")
    assert (c.cpp, c.cpp_ms, c.torch_ms, c.source) == (True, 10.0, 20.0, "measured")


@needs_build
@pytest.mark.parametrize("cpp_s", [0.020, 0.0198])  # slower; faster by only 1% (< MIN_GAIN)
def test_measured_no_faster_the_torch_paths_run_after_one_log_line(monkeypatch, fresh_choice, caplog, cpp_s):
    monkeypatch.setattr(_ops, "measure", _timings(cpp_s, 0.020))
    ran_cs, ran_gru = _spy_op(monkeypatch, "candidate_scores"), _spy_op(monkeypatch, "gru_scan")
    att = DinFcnAttention(8, 8, 16)
    cands, history = torch.randn(50, 8), torch.randn(20, 8)
    unit, x, a, mask = _augru_case()
    with caplog.at_level("INFO", logger="dinrec.nn._ops"):
        with torch.no_grad():
            got = att.score_candidates(cands, history)
            att.score_candidates(cands, history)
        out, _ = unit(x, a, mask)
        unit(x, a, mask)
    assert not ran_cs and not ran_gru
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines  # one per operator, not one per call
    ms = f"C++ {1e3 * cpp_s:.2f} ms vs torch 20.00 ms"
    assert all(ms in line and "the torch path runs" in line for line in lines)
    assert {r.levelname for r in caplog.records} == {"WARNING"}
    with backend("reference"), torch.no_grad():  # the torch paths gave the reference's values
        torch.testing.assert_close(got, att.score_candidates(cands, history), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out, unit(x, a, mask)[0], rtol=1e-5, atol=1e-6)


@needs_build
def test_a_measurement_that_raises_falls_back_to_the_torch_path(monkeypatch, fresh_choice, caplog):
    def raising(op):
        raise RuntimeError("the timer broke")

    monkeypatch.setattr(_ops, "measure", raising)
    with caplog.at_level("WARNING", logger="dinrec.nn._ops"):
        assert not _ops.use("candidate_scores")
        assert not _ops.use("candidate_scores")
    assert len(caplog.records) == 1 and "the timer broke" in caplog.records[0].getMessage()
    assert _ops.choice("candidate_scores").source.startswith("measurement failed")
    ran = _spy_op(monkeypatch, "candidate_scores")
    with torch.no_grad():
        DinFcnAttention(8, 8, 16).score_candidates(torch.randn(50, 8), torch.randn(20, 8))
    assert not ran


@needs_build
def test_the_choice_is_made_per_thread_count(monkeypatch, fresh_choice):
    """Measured once per (operator, thread count), at that thread count; use() follows the
    count in force (here the C++ operator wins on 1 thread and loses on 2)."""
    calls = []

    def measure(op):
        calls.append((op, torch.get_num_threads()))
        return (0.010, 0.020) if torch.get_num_threads() == 1 else (0.030, 0.020)

    monkeypatch.setattr(_ops, "measure", measure)
    before = torch.get_num_threads()
    try:
        for _ in range(2):
            torch.set_num_threads(1)
            assert _ops.use("candidate_scores")
            torch.set_num_threads(2)
            assert not _ops.use("candidate_scores")
    finally:
        torch.set_num_threads(before)
    assert calls == [("candidate_scores", 1), ("candidate_scores", 2)]
    assert set(_ops.choices()) == {("candidate_scores", 1), ("candidate_scores", 2)}
    assert "candidate_scores: torch path (C++ 30.00 ms vs torch 20.00 ms, 2 threads" in \
        _ops.choice("candidate_scores", 2).line()


@needs_build
def test_the_choice_is_kept_on_disk_for_later_processes(monkeypatch, fresh_choice):
    monkeypatch.setattr(_ops, "measure", _timings(0.030, 0.020))
    assert not _ops.use("gru_scan")
    files = list(fresh_choice.glob("choice-gru_scan-*t.json"))
    assert len(files) == 1 and not list(fresh_choice.glob("*.tmp"))

    def boom(op):
        raise AssertionError("measured again")

    monkeypatch.setattr(_ops, "_choices", {})  # a new process
    monkeypatch.setattr(_ops, "measure", boom)
    c = _ops.choice("gru_scan")
    assert (c.cpp, c.cpp_ms, c.torch_ms, c.source) == (False, 30.0, 20.0, "cached")
    files[0].write_text('{"op": "gru_scan", "cpp": tru')  # a damaged file: measured again
    monkeypatch.setattr(_ops, "_choices", {})
    monkeypatch.setattr(_ops, "measure", _timings(0.010, 0.020))
    assert _ops.use("gru_scan")
    assert json.loads(files[0].read_text())["cpp"] is True
    _ops.forget()  # measured again, in this process and the next
    assert not _ops.choices() and not files[0].exists()
    monkeypatch.setattr(_ops, "measure", _timings(0.030, 0.020))
    assert not _ops.use("gru_scan")


def test_concurrent_writers_never_leave_a_partial_cache_file(tmp_path, monkeypatch):
    monkeypatch.setattr(_ops, "build_folder", tmp_path)
    nan = float("nan")
    made = [_ops.Choice("candidate_scores", i % 2 == 0, float(i), nan, 2, "measured") for i in range(200)]
    seen, torn, stop = [], [], threading.Event()
    path = tmp_path / "choice-candidate_scores-2t.json"

    def read():
        while not stop.is_set():
            try:
                seen.append(json.loads(path.read_text()))
            except FileNotFoundError:  # not written yet
                pass
            except ValueError as exc:  # a partial file
                torn.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    writers = [threading.Thread(target=lambda c=c: _ops._write_cache(c)) for c in made]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    stop.set()
    reader.join()
    assert _ops._read_cache("candidate_scores", 2) is not None
    assert seen and not torn  # every read a whole file
    assert all(c["cpp"] == (int(c["cpp_ms"]) % 2 == 0) for c in seen)
    assert list(tmp_path.iterdir()) == [path]


class _Clock:
    """A fake ``time`` module: each timed call advances ``perf_counter`` by its cost."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now

    def call(self, cost: float, log: list, name: str):
        def f():
            log.append(name)
            self.now += cost
        return f


@pytest.mark.parametrize(("cpp_cost", "rounds"), [(1.0, 1), (3.0, 1), (1.9375, _ops.MIN_ROUNDS)])
def test_time_pair_interleaves_and_stops_within_its_budget(monkeypatch, cpp_cost, rounds):
    """One warm-up each, then rounds alternating which goes first; past the budget a clear
    win either way stops after one round, a close call (ratio ~0.97) runs MIN_ROUNDS."""
    clock, order = _Clock(), []
    monkeypatch.setattr(_ops, "time", clock)
    monkeypatch.setattr(_ops, "BUDGET_S", 0.5)
    cpp_s, torch_s = _ops._time_pair(clock.call(cpp_cost, order, "c"), clock.call(2.0, order, "t"))
    assert (cpp_s, torch_s) == pytest.approx((cpp_cost, 2.0))
    assert order[:4] == ["c", "t", "c", "t"] and order.count("c") == order.count("t") == rounds + 1
    if rounds > 1:
        assert order[4:6] == ["t", "c"]


@needs_build
def test_the_real_measurement_runs_both_paths_at_the_production_size(monkeypatch):
    """The registered benchmarks call the C++ operator and the torch path they are compared with."""
    from dinrec.nn import candidate_scores  # noqa: F401  (registers its benchmark)

    ran_cs, ran_gru = _spy_op(monkeypatch, "candidate_scores"), _spy_op(monkeypatch, "gru_scan")
    ran_ref = []
    real_ref = candidate_scores.torch_candidate_scores
    monkeypatch.setattr(candidate_scores, "torch_candidate_scores", lambda *a, **k: ran_ref.append(1) or real_ref(*a, **k))
    monkeypatch.setattr(_ops, "BUDGET_S", 0.0)
    with torch.no_grad():  # the caller's mode does not matter: GRU is timed forward + backward
        for op in ("candidate_scores", "gru_scan"):
            cpp_s, torch_s = _ops._timer(op)
            assert cpp_s > 0 and torch_s > 0
    assert ran_cs and ran_gru and ran_ref
    assert sorted(_ops.BENCHMARKS) == ["candidate_scores", "gru_scan", "offset_mlp", "offset_mlp_bf16"]
    cpp_s, torch_s = _ops._timer("offset_mlp")
    assert cpp_s > 0 and torch_s > 0


@needs_build
def test_a_build_lock_left_by_a_killed_build_does_not_stall_the_next_process():
    """torch's build lock is a plain file that only its creator removes: a build killed
    midway leaves it, and without dinrec's OS lock the next process waits for it forever.
    A fresh process finds the library (already built) despite a leftover lock."""
    import subprocess
    import sys

    assert _ops.build_folder is not None
    stale = _ops.build_folder / "lock"
    stale.touch()
    try:
        code = "from dinrec.nn import _ops; print('available', _ops.available())"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert "available True" in out.stdout, out.stderr[-2000:]
        assert not stale.exists()
    finally:
        stale.unlink(missing_ok=True)
