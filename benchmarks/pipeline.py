"""The in-pipeline benchmark (issue 14): fastmask and its neighbours in one process.

A thread pool keeps spinning for a while after a call (NumPy's OpenBLAS workers
about 0.1 s, OpenMP threads after a parallel region, torch's own OpenMP pool), so
in a pipeline each library's call may share the cores with another's idle threads.
For each fastmask case F and neighbour N this times F alone, F right after N, N
alone and N right after F, and reports each "after" median over its "alone" median.
The target: no case, in either direction, above 1.15x its time alone.

A neighbour also leaves the caches holding its own data, and on a machine whose last
level cache holds most of a workload (a 260 MB L3 keeps A3's kept K/V between two
back-to-back calls) that alone slows the next call. So each pair is also timed with
the pools idle: the same alternation with :data:`IDLE` seconds of busy Python between
the calls, after which every pool's workers have gone to sleep. ``after / idle`` is
what the thread pools cost, the rest is the caches; both are reported. It also times
one transformer encoder layer in NumPy + ``fm.attention`` against the same layer in
torch.

Everything runs in one fresh process (not the suite's own, whose pools and imports
depend on what it ran before), at the same thread count for every library.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator

import numpy as np

import fastmask as fm
from fastmask import openblas_spin

from .isolation import python_child
from .targets import Target
from .workloads import WORKLOADS

TARGET = 1.15  # the goal: "after" / "alone" at most this, in both directions
ROUNDS = 5  # rounds of [alone blocks, mixed blocks], so drift hits both alike
SETTLE = 0.15  # seconds of a block's own calls before timing: other pools' spin has ended
IDLE = 0.02  # seconds between the calls of the control: longer than any pool's spin
MISSED = f"MISSED (target <= {TARGET}x)"
CONTROL = "control: pools idle in between"
_TAG = "fastmask-pipeline-result: "

#: Small shapes of the same workloads, for the tests (``small=True``).
_SMALL = {"A1": {"b": 2, "h": 3, "length": 40, "d": 16, "shortest": 8},
          "A2": {"h": 2, "length": 64, "d": 16},
          "A3": {"b": 3, "hq": 8, "hk": 2, "length": 64, "d": 16},
          "A4": {"h": 2, "length": 96, "d": 16, "window": 16},
          "W1": {"b": 2, "h": 2, "length": 32, "shortest": 8},
          "W2": {"h": 2, "length": 64}}  # fmt: skip

Call = Callable[[], object]


# ----------------------------------------------------------- what is timed


def fastmask_cases(small: bool = False) -> Iterator[tuple[str, Call]]:
    """The suite's attention and masked-softmax workloads at their sizes (or the tests')."""
    for name in ("A1", "A2", "A3", "A4", "W1", "W2"):
        inp = WORKLOADS[name].make(np.random.default_rng(0), **(_SMALL[name] if small else {}))
        if WORKLOADS[name].op == "attention":
            yield f"{name} fm.attention", lambda i=inp: fm.attention(i.q, i.k, i.v, **i.kwargs)
        else:
            yield f"{name} fm.masked_softmax", lambda i=inp: fm.masked_softmax(i.x, **i.kwargs)


def neighbour_cases(torch, small: bool = False) -> Iterator[tuple[str, Call]]:
    """A square matmul and a BERT feed-forward matmul, in NumPy and in torch (float32)."""
    n, (t, d, f) = (64, (64, 32, 128)) if small else (1024, (4096, 768, 3072))
    rng = np.random.default_rng(1)
    for label, m, k, cols in ((f"matmul {n}", n, n, n), (f"FFN {t}x{d}x{f}", t, d, f)):
        a = rng.standard_normal((m, k), dtype=np.float32)
        b = rng.standard_normal((k, cols), dtype=np.float32)
        out = np.empty((m, cols), np.float32)  # preallocated: no page faults in the timings
        yield f"numpy {label}", lambda a=a, b=b, out=out: np.matmul(a, b, out=out)
        if torch is not None:
            ta, tb, tout = (torch.from_numpy(x) for x in (a, b, out.copy()))
            yield f"torch {label}", lambda a=ta, b=tb, out=tout: torch.matmul(a, b, out=out)


def _block(cycle: list[Call], n: int, settle: float) -> list[list[float]]:
    """Seconds of each call of ``cycle``, run ``n`` times in turn after an untimed start.

    The start runs whole cycles for at least ``settle`` seconds (at least one): what
    the previous block left spinning has stopped, and every timed call follows the
    one before it in the cycle. Busy, never asleep: a sleeping core clocks down.
    """
    start = time.perf_counter()
    while True:
        for fn in cycle:
            fn()
        if time.perf_counter() - start >= settle:
            break
    times: list[list[float]] = [[] for _ in cycle]
    for _ in range(n):
        for fn, ts in zip(cycle, times, strict=True):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
    return times


def _idle(seconds: float = IDLE) -> None:
    """Busy Python for ``seconds``: the pools fall asleep, the caches keep their data
    (a sleeping core would clock down)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def interplay(f: Call, nb: Call, samples: int, settle: float = SETTLE) -> dict[str, float]:
    """Median seconds of ``f`` and ``nb`` alone (back to back), right after each other,
    and right after each other with the pools idle in between (``... idle``).

    Alone and mixed are measured in ``ROUNDS`` alternating rounds; the mixed block
    alternates ``nb, f, nb, f, ...``, so every timed ``f`` directly follows an ``nb``
    and every timed ``nb`` an ``f`` (one block serves both directions); the control
    block does the same with :func:`_idle` between the calls.
    """
    per = max(1, samples // ROUNDS)
    got: dict[str, list[float]] = {
        k: [] for k in ("f", "n", "f after n", "n after f", "f after n idle", "n after f idle")
    }
    for _ in range(ROUNDS):
        got["f"] += _block([f], per, settle)[0]
        got["n"] += _block([nb], per, settle)[0]
        n_after, f_after = _block([nb, f], per, 0.0)  # no settle: the interplay is the point
        got["n after f"] += n_after
        got["f after n"] += f_after
        n_idle, _, f_idle, _ = _block([nb, _idle, f, _idle], per, 0.0)
        got["n after f idle"] += n_idle
        got["f after n idle"] += f_idle
    return {k: statistics.median(v) for k, v in got.items()}


# ----------------------------------------------------------- the encoder layer
# layer_norm and encoder_layer are copied from docs/encoder-layer.md ("The layer"), with
# the head count passed in rather than read from that page's globals.


def layer_norm(x, gain_bias, eps=1e-5):
    gain, bias = gain_bias
    mean = x.mean(-1, keepdims=True)
    var = x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * gain + bias


def encoder_layer(x, lengths, p, attend, heads):
    """Post-LN encoder layer; ``attend(q, k, v, lengths)`` is the attention."""
    b, length, d_model = x.shape

    def split_heads(t):  # (B, L, d_model) -> (B, H, L, dh)
        return t.reshape(b, length, heads, d_model // heads).transpose(0, 2, 1, 3)

    def merge_heads(t):  # (B, H, L, dh) -> (B, L, d_model)
        return t.transpose(0, 2, 1, 3).reshape(b, length, d_model)

    q = split_heads(x @ p["wq"])
    k = split_heads(x @ p["wk"])
    v = split_heads(x @ p["wv"])
    a = merge_heads(attend(q, k, v, lengths)) @ p["wo"]
    h = layer_norm(x + a, p["ln1"])
    f = np.maximum(h @ p["w1"] + p["b1"], 0) @ p["w2"] + p["b2"]
    return layer_norm(h + f, p["ln2"])


def fastmask_attention(q, k, v, lengths):
    return fm.attention(q, k, v, fm.masks.padding(lengths))


def torch_encoder_layer(torch, x, keep, p, heads):
    """``encoder_layer`` in torch: matmuls, ``scaled_dot_product_attention`` with a
    boolean keep-mask ``(B, 1, 1, L)``, ``layer_norm``."""
    F = torch.nn.functional
    b, length, d_model = x.shape

    def split_heads(t):
        return t.view(b, length, heads, d_model // heads).transpose(1, 2)

    q, k, v = (split_heads(x @ p[w]) for w in ("wq", "wk", "wv"))
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    a = o.transpose(1, 2).reshape(b, length, d_model) @ p["wo"]
    h = F.layer_norm(x + a, (d_model,), *p["ln1"], eps=1e-5)
    f = torch.relu(h @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
    return F.layer_norm(h + f, (d_model,), *p["ln2"], eps=1e-5)


def encoder_inputs(small: bool = False):
    """``(x, lengths, params, heads)``: BERT-base sizes, a padded batch of 2 x 512 tokens."""
    b, length, d_model, heads, d_ff = (3, 12, 32, 4, 64) if small else (2, 512, 768, 12, 3072)
    rng = np.random.default_rng(2)

    def dense(n_in, n_out):
        return (rng.standard_normal((n_in, n_out)) / np.sqrt(n_in)).astype(np.float32)

    norm = (np.ones(d_model, np.float32), np.zeros(d_model, np.float32))
    params = {"wq": dense(d_model, d_model), "wk": dense(d_model, d_model),
              "wv": dense(d_model, d_model), "wo": dense(d_model, d_model),
              "w1": dense(d_model, d_ff), "w2": dense(d_ff, d_model),
              "b1": np.zeros(d_ff, np.float32), "b2": np.zeros(d_model, np.float32),
              "ln1": norm, "ln2": norm}  # fmt: skip
    x = rng.standard_normal((b, length, d_model), dtype=np.float32)
    lengths = rng.integers(length // 4, length + 1, size=b)
    return x, lengths, params, heads


def encoder_calls(torch, small: bool = False) -> tuple[Call, Call | None, str]:
    """The NumPy + fastmask layer, the torch layer (None without torch), and a label."""
    x, lengths, p, heads = encoder_inputs(small)
    label = f"x {x.shape}, {heads} heads, d_ff {p['w1'].shape[1]}, padding {lengths.tolist()}"
    numpy_layer = lambda: encoder_layer(x, lengths, p, fastmask_attention, heads)  # noqa: E731
    if torch is None:
        return numpy_layer, None, label
    tp = {k: tuple(map(torch.from_numpy, v)) if isinstance(v, tuple) else torch.from_numpy(v)
          for k, v in p.items()}  # fmt: skip
    keep = torch.from_numpy(np.arange(x.shape[1]) < lengths[:, None])[:, None, None, :]
    tx = torch.from_numpy(x)

    def torch_layer():
        with torch.inference_mode():
            return torch_encoder_layer(torch, tx, keep, tp, heads)

    return numpy_layer, torch_layer, label


# ----------------------------------------------------------- the report


def measure(threads: int, samples: int, small: bool = False, settle: float = SETTLE):
    """Yield the report's ``Result`` rows, measured in this process at ``threads``."""
    from .runner import Result

    try:
        import torch
    except ImportError:
        torch = None
    old = fm.threads.num_threads_setting(), torch.get_num_threads() if torch else None
    fm.set_num_threads(threads)
    if torch is not None:
        torch.set_num_threads(threads)
    try:  # NumPy's BLAS pool at the same count (restored on exit)
        from threadpoolctl import threadpool_limits

        limits = threadpool_limits(threads, user_api="blas")
    except ImportError:
        limits = None
    try:
        if torch is None:
            yield Result("pipeline", "torch neighbours", None, "torch not installed: left out")
        blas = "; ".join(f"{os.path.basename(p)}: {d}" for p, d in openblas_spin.setting().items())
        yield Result("pipeline", "thread policy", None,
                     f"fastmask's OpenMP spin: {fm.threads.openmp_spin_setting()}; "
                     f"OpenBLAS: {blas or 'none loaded'}")  # fmt: skip
        cases, neighbours = list(fastmask_cases(small)), list(neighbour_cases(torch, small))
        for fname, f in cases:
            for nname, nb in neighbours:
                t = interplay(f, nb, samples, settle)
                directions = (
                    (fname, nname, t["f"], t["f after n"], t["f after n idle"]),
                    (nname, fname, t["n"], t["n after f"], t["n after f idle"]),
                )
                for timed, other, alone, after, idle in directions:
                    ratio = after / alone
                    verdict = "ok" if ratio <= TARGET else MISSED
                    yield Result("pipeline", f"{timed} after {other}", after, verdict, ratio, "x")
                    yield Result("pipeline", f"{timed} after {other}, pools idle", idle,
                                 CONTROL, idle / alone, "x")  # fmt: skip
        numpy_layer, torch_layer, label = encoder_calls(torch, small)
        got: dict[str, list[float]] = {"numpy": [], "torch": []}
        for _ in range(ROUNDS):  # alternating blocks, each library's pools to itself
            got["numpy"] += _block([numpy_layer], max(1, samples // ROUNDS), settle)[0]
            if torch_layer is not None:
                got["torch"] += _block([torch_layer], max(1, samples // ROUNDS), settle)[0]
        s_np = statistics.median(got["numpy"])
        yield Result("pipeline", "encoder layer: NumPy + fm.attention", s_np, label)
        if torch_layer is not None:
            s_t = statistics.median(got["torch"])
            yield Result("pipeline", "encoder layer: torch matmuls + sdpa", s_t, label)
            yield Result("pipeline", "encoder layer: NumPy + fm.attention / torch", None,
                         "no target; < 1: the NumPy layer is faster", s_np / s_t, "x")  # fmt: skip
    finally:  # the caller's settings back, in reverse order: threadpoolctl's restore
        if limits is not None:  # also resets the OpenMP count that torch shares
            limits.restore_original_limits()
        fm.set_num_threads(old[0])
        if torch is not None:
            torch.set_num_threads(old[1])


def _child(threads: int, samples: int, small: bool, settle: float) -> None:
    from dataclasses import asdict

    for r in measure(threads, samples, small, settle):
        print(_TAG + json.dumps(asdict(r)), flush=True)


def report(threads: int, quick: bool, progress, small: bool = False) -> list:
    """The report's rows, measured in a fresh process; ``progress`` gets each row."""
    from .runner import Result

    w = WORKLOADS["pipeline"]
    samples = w.quick_repeats if quick else w.repeats
    settle = 0.0 if small else SETTLE  # small: the tests' shapes, where only the rows matter
    code = f"from {__name__} import _child; _child({threads}, {samples}, {small}, {settle})"
    argv, env = python_child(code)
    results = []
    with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=env) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(_TAG):
                results.append(Result(**json.loads(line[len(_TAG) :])))
                progress(results[-1])
    if proc.returncode:
        raise RuntimeError(f"the pipeline benchmark's process failed ({proc.returncode})")
    return results


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms" if seconds >= 1e-4 else f"{seconds * 1e6:.1f} us"


def format_rows(rows) -> list[str]:
    """The report's lines: the timed call, the call right before it, both medians, the
    ratio, the control's ratio (pools idle in between) and the pools' share (ratio over
    the control's), the verdict; then the encoder layer."""
    pairs = [r for r in rows if r.note in ("ok", MISSED)]
    idle = {r.impl.removesuffix(", pools idle"): r for r in rows if r.note == CONTROL}
    lines = [f"  {'timed':<24} {'right after':<24} {'alone':>10} {'after':>10} {'ratio':>7}"
             f" {'idle':>6} {'pools':>6}"]  # fmt: skip
    for r in pairs:
        timed, other = r.impl.split(" after ", 1)
        alone = _ms(r.seconds / r.value)  # the ratio is of the medians
        c = idle.get(r.impl)
        control = f"{c.value:>5.2f}x {r.value / c.value:>5.2f}x" if c else f"{'':>13}"
        lines.append(f"  {timed:<24} {other:<24} {alone:>10} {_ms(r.seconds):>10} "
                     f"{r.value:>6.2f}x {control}  {r.note}")  # fmt: skip
    lines.append(
        f"  (idle: the pair with {IDLE * 1e3:.0f} ms of busy Python between the calls, "
        "over alone: the caches' part; pools: ratio / idle, the thread pools' part)"
    )
    for r in rows:
        if not any(r is p for p in pairs) and r.note != CONTROL:
            shown = (
                _ms(r.seconds) if r.seconds is not None else f"{r.value:.2f}x" if r.value else ""
            )
            lines.append(f"  {r.impl:<46} {shown:>10}   {r.note}".rstrip())
    return lines


def check(results) -> list[Target]:
    """The issue's target over this run's rows (the worst "after" / "alone" ratio), and
    the same over the thread pools' part alone ("after" / "after with the pools idle")."""
    rows = [r for r in results if r.workload == "pipeline" and r.note in ("ok", MISSED)]
    if not rows:
        return []
    worst = max(rows, key=lambda r: r.value)
    missed = sum(r.note == MISSED for r in rows)
    name = f"pipeline: worst of {len(rows)} ({missed} missed): {worst.impl}"
    targets = [Target(name, worst.value, f"<= {TARGET}", worst.value <= TARGET)]
    idle = {r.impl.removesuffix(", pools idle"): r.value
            for r in results if r.workload == "pipeline" and r.note == CONTROL}  # fmt: skip
    shares = {r.impl: r.value / idle[r.impl] for r in rows if r.impl in idle}
    if shares:
        impl = max(shares, key=shares.__getitem__)
        over = sum(v > TARGET for v in shares.values())
        name = (f"pipeline, thread pools' part (ratio / idle): worst of {len(shares)} "
                f"({over} over): {impl}")  # fmt: skip
        targets.append(Target(name, shares[impl], f"<= {TARGET}", shares[impl] <= TARGET))
    return targets
