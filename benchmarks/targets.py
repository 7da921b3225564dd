"""fastmask's performance targets, checked against one run's results.

Each target is a ratio measured side by side in the same run (or, for cold start
and memory, in fresh child processes), never an absolute time on its own.
"""

from __future__ import annotations

from dataclasses import dataclass

MB = 1 << 20


@dataclass
class Target:
    name: str
    measured: float
    goal: str
    met: bool
    unit: str = "x"

    def line(self) -> str:
        mark = "met" if self.met else "MISSED"
        value = f"{self.measured:.2f}{self.unit}" if self.unit == "x" else (
            f"{self.measured:.3g} {self.unit}"
        )  # fmt: skip
        return f"  {mark:<7} {self.name:<52} {value:>12}   goal {self.goal}"


def _times(results, workload):
    return {r.impl: r.seconds for r in results if r.workload == workload and r.seconds}


def _values(results, workload):
    return {r.impl: r.value for r in results if r.workload == workload and r.value is not None}


def check(results) -> list[Target]:
    """The targets that this run's results can decide (others are left out)."""
    out: list[Target] = []
    for w in ("W1", "W2", "W6"):
        t = _times(results, w)
        copy = t.get("copy (np.copyto)")
        best_out = min((s for name, s in t.items() if name.endswith("out=")), default=None)
        auto = t.get("fastmask (auto)")
        if copy and best_out:
            r = best_out / copy
            out.append(Target(f"{w}: best fastmask out= / copy", r, "<= 1.3", r <= 1.3))
        if auto and t.get("onnxruntime add+softmax"):
            r = t["onnxruntime add+softmax"] / auto
            out.append(Target(f"{w}: onnxruntime / fastmask (auto)", r, ">= 2", r >= 2))
        for peer in ("torch masked_fill+softmax", "torch _masked_softmax"):
            if auto and t.get(peer):
                r = t[peer] / auto
                out.append(Target(f"{w}: {peer} / fastmask (auto)", r, ">= 10", r >= 10))
    t = _times(results, "W3")
    for peer in ("torch masked_fill+softmax", "torch _masked_softmax"):
        if t.get("fastmask (auto)") and t.get(peer):
            r = t[peer] / t["fastmask (auto)"]
            out.append(Target(f"W3: {peer} / fastmask (auto)", r, ">= 20", r >= 20))
    t = _times(results, "W4")
    if t.get("fastmask (auto)") and t.get("torch masked_fill+softmax"):
        r = t["fastmask (auto)"] / t["torch masked_fill+softmax"]
        out.append(Target("W4: fastmask (auto) / torch masked_fill+softmax", r, "<= 0.5", r <= 0.5))
    t = _times(results, "tiny")
    if t.get("fastmask (auto)"):
        us = t["fastmask (auto)"] * 1e6
        out.append(Target("tiny: repeat call, total", us, "< 10 us", us < 10, "us"))
    # Attention (issue 14): against the fastest of the fused-attention peers, each in
    # its own process; decode against the time to read its kept K and V once.
    fused_peers = ("torch sdpa", "torch flex_attention", "onnxruntime attention",
                   "onnxruntime contrib MHA/GQA", "openvino sdpa")  # fmt: skip
    for w in ("A1", "A2", "A3"):
        t = _times(results, w)
        auto = t.get("fastmask (auto)")
        timed = {p: t[p] for p in fused_peers if t.get(p)}
        if auto and timed:
            best = min(timed, key=timed.get)
            r = timed[best] / auto
            out.append(Target(f"{w}: fastest peer ({best}) / fastmask", r, ">= 1.3", r >= 1.3))
    t = _times(results, "A3")
    if t.get("fastmask (auto)") and t.get("read kept K/V once"):
        r = t["fastmask (auto)"] / t["read kept K/V once"]
        out.append(Target("A3: fastmask (auto) / read kept K/V once", r, "<= 1.5", r <= 1.5))
    t = _times(results, "A4")
    if t.get("fastmask (auto)") and t.get("torch flex_attention"):
        r = t["torch flex_attention"] / t["fastmask (auto)"]
        out.append(Target("A4: torch flex_attention / fastmask (auto)", r, ">= 3", r >= 3))
    v = _values(results, "scaling")
    if v.get("fastmask (auto) speed-up"):
        r = v["fastmask (auto) speed-up"]
        out.append(Target("scaling: W1 1 thread / N threads (auto)", r, ">= 1.7", r >= 1.7))
    v = _values(results, "startup")
    if "import fastmask" in v:
        s = v["import fastmask"]
        out.append(Target("startup: import fastmask", s, "< 0.3 s", s < 0.3, "s"))
    for name, s in v.items():
        if name.startswith("first call") and name.endswith("(auto)"):
            out.append(Target(f"startup: {name}", s, "< 1 s", s < 1, "s"))
    v = _values(results, "memory")
    for name, extra in v.items():
        if name.endswith("peak - baseline - (input + output)"):
            backend = name.split()[0]
            out.append(
                Target(f"memory: W2 {backend} peak over input + output", extra / MB,
                       "<= 64 MB", extra <= 64 * MB, "MB")
            )  # fmt: skip
    return out
