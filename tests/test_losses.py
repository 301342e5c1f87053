"""The chunked cross-entropy equals the full-logits loss, forwards and backwards, and never builds [N, V]."""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemmax.train.losses import LossSums, chunked_cross_entropy, lm_loss, naive_cross_entropy, output_head


def _inputs(b: int = 2, t: int = 13, d: int = 16, v: int = 97, seed: int = 0):
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
    head = jnp.asarray(rng.normal(size=(v, d)) * 0.5, jnp.float32)
    targets = jnp.asarray(rng.integers(0, v, size=(b, t)), jnp.int32)
    mask = jnp.asarray(rng.random((b, t)) > 0.3, jnp.float32)
    return hidden, head, targets, mask


def _mean(f, *args, **kw):
    s = f(*args, **kw)
    return s.sum_loss / s.n_tokens


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("chunk", [1, 5, 1000])
def test_matches_naive_loss_and_gradient(softcap, chunk):
    hidden, head, targets, mask = _inputs()
    ref = naive_cross_entropy(hidden, head, targets, mask, softcap=softcap)
    got = chunked_cross_entropy(hidden, head, targets, mask, softcap=softcap, chunk_size=chunk)
    np.testing.assert_allclose(got.sum_loss, ref.sum_loss, rtol=1e-5)
    assert float(got.n_tokens) == float(mask.sum())
    assert float(got.n_correct) == float(ref.n_correct)

    g_ref = jax.jit(jax.grad(lambda h, e: _mean(naive_cross_entropy, h, e, targets, mask, softcap=softcap),
                             argnums=(0, 1)))(hidden, head)
    g_got = jax.jit(jax.grad(lambda h, e: _mean(chunked_cross_entropy, h, e, targets, mask, softcap=softcap,
                                                chunk_size=chunk), argnums=(0, 1)))(hidden, head)
    for a, b in zip(g_got, g_ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_scale_and_mask_gradients_match_naive():
    """The fused VJP is exact for every differentiable input, the int8 head's per-vocab scale and the mask
    weights included, with a soft-cap and the [D, V] layout."""
    hidden, head, targets, mask = _inputs()
    scale = jnp.asarray(np.random.default_rng(3).uniform(0.5, 1.5, head.shape[0]), jnp.float32)
    mask = mask * jnp.asarray(np.random.default_rng(4).uniform(0.5, 2.0, mask.shape), jnp.float32)

    def loss(f, h, e, sc, m, **kw):
        return f(h, e, targets, m, softcap=2.0, head_scale=sc, **kw).sum_loss

    args = (hidden, head, scale, mask)
    g_ref = jax.grad(lambda *a: loss(naive_cross_entropy, *a), argnums=(0, 1, 2, 3))(*args)
    g_got = jax.grad(lambda h, e, sc, m: loss(chunked_cross_entropy, h, e.T, sc, m, head_is_vd=False,
                                              chunk_size=6), argnums=(0, 1, 2, 3))(*args)
    for name, a, b in zip(("hidden", "head", "scale", "mask"), g_got, g_ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=name)
        assert float(jnp.abs(b).max()) > 1e-2, name  # each gradient is far from zero: the check has teeth


def _dot_count(fn, *args) -> int:
    return str(jax.make_jaxpr(fn)(*args)).count("dot_general")


def test_frozen_head_costs_no_head_gradient_product():
    """A LoRA step differentiates the hidden states only: the loss then runs two head-sized products (logits,
    the hidden's gradient) and no third (the head's gradient, or a recomputation of the logits)."""
    hidden, head, targets, mask = _inputs()

    def f(h, e):
        return chunked_cross_entropy(h, e, targets, mask, chunk_size=5).sum_loss

    # each chunk's products appear twice in the program: the first chunk's, then the scan's over the rest
    # (``losses.scan_summing``: the first chunk's head gradient starts the sum)
    assert _dot_count(f, hidden, head) == 2 * 1
    assert _dot_count(jax.value_and_grad(f, argnums=0), hidden, head) == 2 * 2
    assert _dot_count(jax.value_and_grad(f, argnums=(0, 1)), hidden, head) == 2 * 3


def test_reference_is_plain_cross_entropy():
    hidden, head, targets, mask = _inputs(b=1, t=4, v=11)
    logits = np.asarray(hidden[0] @ head.T, np.float64)
    lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = -(lp[np.arange(4), np.asarray(targets[0])] * np.asarray(mask[0])).sum()
    got = naive_cross_entropy(hidden, head, targets, mask)
    np.testing.assert_allclose(got.sum_loss, want, rtol=1e-5)
    acc = ((logits.argmax(-1) == np.asarray(targets[0])) * np.asarray(mask[0])).sum()
    assert float(got.n_correct) == acc


def test_dv_head_and_padding_targets_are_safe():
    hidden, head, targets, mask = _inputs()
    # out-of-range / negative targets under a zero mask must not produce NaN
    bad_targets = jnp.where(mask > 0, targets, -100)
    a = chunked_cross_entropy(hidden, head.T, bad_targets, mask, head_is_vd=False, chunk_size=7)
    b = naive_cross_entropy(hidden, head, targets, mask)
    np.testing.assert_allclose(a.sum_loss, b.sum_loss, rtol=1e-5)
    g = jax.grad(lambda e: chunked_cross_entropy(hidden, e, bad_targets, mask, head_is_vd=False).sum_loss)(
        head.T)
    assert bool(jnp.isfinite(g).all())


def test_logits_never_materialised_in_full():
    """The compiled backward holds no [N, V] buffer: only [chunk, V] ones."""
    b, t, d, v, chunk = 2, 64, 8, 4099, 16
    hidden, head, targets, mask = _inputs(b, t, d, v)

    def f(h, e):
        return chunked_cross_entropy(h, e, targets, mask, chunk_size=chunk).sum_loss

    hlo = jax.jit(jax.grad(f, argnums=(0, 1))).lower(hidden, head).as_text()
    assert f"{b * t}x{v}x" not in hlo and f"{b}x{t}x{v}x" not in hlo
    assert f"{chunk}x{v}xf32" in hlo


def test_bf16_hidden_close_to_f32():
    hidden, head, targets, mask = _inputs()
    a = chunked_cross_entropy(hidden.astype(jnp.bfloat16), head.astype(jnp.bfloat16), targets, mask)
    b = naive_cross_entropy(hidden, head, targets, mask)
    assert a.sum_loss.dtype == jnp.float32
    np.testing.assert_allclose(a.sum_loss, b.sum_loss, rtol=3e-2)


class _Cfg:
    def __init__(self, tie: bool, cap: float | None):
        self.tie_embeddings = tie
        self.final_logit_softcap = cap


def test_lm_loss_picks_head_and_softcap():
    hidden, head, targets, mask = _inputs()
    tied = {"token_embedding": {"embeddings": head}}
    assert output_head(tied, _Cfg(True, None))[1] is True
    scaled = {"token_embedding": {"embeddings": head, "scale": jnp.linspace(0.5, 2.0, head.shape[0])}}
    np.testing.assert_allclose(
        lm_loss(scaled, _Cfg(True, None), hidden, targets, mask, chunk_size=5).sum_loss,
        naive_cross_entropy(hidden, head, targets, mask, head_scale=scaled["token_embedding"]["scale"]).sum_loss,
        rtol=1e-5)
    got = lm_loss(tied, _Cfg(True, 2.0), hidden, targets, mask, chunk_size=8)
    want = naive_cross_entropy(hidden, head, targets, mask, softcap=2.0)
    np.testing.assert_allclose(got.sum_loss, want.sum_loss, rtol=1e-5)
    untied = {"token_embedding": {"embeddings": head * 0}, "lm_head": {"kernel": head.T}}
    got = lm_loss(untied, _Cfg(False, None), hidden, targets, mask)
    want = naive_cross_entropy(hidden, head, targets, mask)
    np.testing.assert_allclose(got.sum_loss, want.sum_loss, rtol=1e-5)
    assert isinstance(got, LossSums)


@pytest.mark.parametrize("family", ["gemma2", "llama"])
def test_matches_model_logits(family):
    """lm_loss on forward_hidden equals cross-entropy on the model's own logits (head, soft-cap)."""
    model = importlib.import_module("gemmax.models.gemma.model")
    from gemmax.models.gemma.config import tiny_config

    cfg = tiny_config(family, num_layers=2)
    params = model.init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, cfg.vocab_size)
    targets = jnp.roll(tokens, -1, axis=1)
    mask = jnp.ones((2, 12), jnp.float32).at[:, -1].set(0)

    @jax.jit
    def both(params):
        hidden = model.forward_hidden(params, cfg, tokens)
        logits = model.logits_from_hidden(params, cfg, hidden)
        lse = jax.nn.logsumexp(logits, -1)
        want = ((lse - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]) * mask).sum()
        return want, lm_loss(params, cfg, hidden, targets, mask, chunk_size=7).sum_loss

    want, got = both(params)
    np.testing.assert_allclose(got, want, rtol=1e-5)


# ---- per-token log-probs (the post-training objectives' shared piece) ---------------------------------------


@pytest.mark.parametrize("cap,temperature,chunk,quantized", [(None, 1.0, 1024, False), (3.0, 0.7, 5, False),
                                                             (None, 1.3, 4, True)])
def test_token_log_probs_and_their_gradients_match_full_logits(cap, temperature, chunk, quantized):
    """Values and gradients (hidden only, as under LoRA; hidden and head, as in a full fine-tune) equal autodiff
    of the full [N, V] log-softmax; with a frozen head the backward pass holds no head-sized product."""
    from gemmax.train.objectives import token_log_probs

    hidden, head, targets, _ = _inputs(v=97)
    cot = jnp.asarray(np.random.default_rng(5).normal(size=targets.shape), jnp.float32)
    scale = jnp.asarray(np.random.default_rng(6).uniform(0.5, 1.5, 97), jnp.float32)

    def params(e):
        emb = {"embeddings": e, "scale": scale} if quantized else {"embeddings": e}
        return {"token_embedding": emb}

    def full(h, e):
        z = jnp.einsum("btd,vd->btv", h, e) * (scale if quantized else 1.0)
        z = z if cap is None else cap * jnp.tanh(z / cap)
        lp = jax.nn.log_softmax(z / temperature, -1)
        return (jnp.take_along_axis(lp, targets[..., None], -1)[..., 0] * cot).sum()

    def ours(h, e):
        return (token_log_probs(params(e), _Cfg(True, cap), h, targets, chunk_size=chunk,
                                temperature=temperature) * cot).sum()

    np.testing.assert_allclose(ours(hidden, head), full(hidden, head), rtol=1e-5)
    for argnums in (0, (0, 1)):
        want = jax.grad(full, argnums=argnums)(hidden, head)
        got = jax.grad(ours, argnums=argnums)(hidden, head)
        for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
            assert float(jnp.abs(w).max()) > 1e-3
            np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-5)
    jaxpr = str(jax.make_jaxpr(jax.grad(ours))(hidden, head))
    assert jaxpr.count("dot_general") == 2 and "checkpoint" not in jaxpr  # logits and d/dh, forward only
    if quantized:  # a trained scale under a frozen head (the hand-written backward's other branch)
        def full_s(h, e, sc):
            z = jnp.einsum("btd,vd->btv", h, e) * sc
            z = z if cap is None else cap * jnp.tanh(z / cap)
            lp = jax.nn.log_softmax(z / temperature, -1)
            return (jnp.take_along_axis(lp, targets[..., None], -1)[..., 0] * cot).sum()

        def ours_s(h, e, sc):
            p = {"token_embedding": {"embeddings": e, "scale": sc}}
            return (token_log_probs(p, _Cfg(True, cap), h, targets, chunk_size=chunk,
                                    temperature=temperature) * cot).sum()

        want = jax.grad(lambda h, sc: full_s(h, head, sc), argnums=(0, 1))(hidden, scale)
        got = jax.grad(lambda h, sc: ours_s(h, head, sc), argnums=(0, 1))(hidden, scale)
        for g, w in zip(got, want, strict=True):
            assert float(jnp.abs(w).max()) > 1e-3
            np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-5)


native = pytest.mark.skipif(not importlib.import_module("gemmax.kernels.cpu").available(),
                            reason="the native CPU kernels need a C++ compiler")


@native
@pytest.mark.parametrize("head_is_vd", [True, False])
@pytest.mark.parametrize("chunk", [4, 1000])
def test_native_softmax_passes_match_xla(head_is_vd, chunk):
    """The native CPU kernel's loss, accuracy count and gradients (hidden and head, weighted mask, padding
    chunks, a vocabulary that is no multiple of the vector width) equal XLA's passes: chunks of 4 rows (the
    GEMV paths) and of 1000 (the GEMM)."""
    hidden, head, targets, mask = _inputs(v=1003)
    mask = mask * jnp.asarray(np.random.default_rng(5).uniform(0.5, 2.0, mask.shape), jnp.float32)
    w = head if head_is_vd else head.T

    def loss(kernel, h, e):
        s = chunked_cross_entropy(h, e, targets, mask, chunk_size=chunk, head_is_vd=head_is_vd, kernel=kernel)
        return s.sum_loss, s

    (l_x, s_x), g_x = jax.jit(jax.value_and_grad(lambda h, e: loss("xla", h, e), argnums=(0, 1), has_aux=True))(
        hidden, w)
    (l_c, s_c), g_c = jax.jit(jax.value_and_grad(lambda h, e: loss("cpu", h, e), argnums=(0, 1), has_aux=True))(
        hidden, w)
    np.testing.assert_allclose(l_c, l_x, rtol=1e-6)
    assert float(s_c.n_correct) == float(s_x.n_correct)
    for a, b in zip(g_c, g_x, strict=True):
        assert float(jnp.abs(b).max()) > 1e-3
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    hlo = jax.jit(jax.grad(lambda h: loss("cpu", h, w)[0])).lower(hidden).as_text()
    assert "gemmax_cpu_softmax_xent" in hlo
    # a tied head's product for the hidden states' gradient (contracting over the vocabulary) runs on the
    # native GEMM too; an untied [D, V] head's stays with XLA's dot
    assert ("gemmax_cpu_gemv" in hlo) == head_is_vd
    # so does a trained tied head's own gradient g^T h (contracting over the rows)
    hlo = jax.jit(jax.grad(lambda e: loss("cpu", hidden, e)[0])).lower(w).as_text()
    assert ("gemmax_cpu_gemm_tn" in hlo) == head_is_vd


@native
def test_native_softmax_passes_bfloat16_and_unknown_kernel():
    """With bfloat16 hidden states the kernel writes the gradient in bfloat16, as XLA's path rounds it; an
    unknown kernel name is refused."""
    hidden, head, targets, mask = _inputs(v=515)
    hb, eb = hidden.astype(jnp.bfloat16), head.astype(jnp.bfloat16)

    def grad(kernel):
        return jax.grad(lambda h: chunked_cross_entropy(h, eb, targets, mask, chunk_size=8,
                                                        kernel=kernel).sum_loss)(hb)

    a, b = grad("cpu"), grad("xla")
    assert a.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=2e-2, atol=2e-3)
    with pytest.raises(ValueError, match="unknown loss kernel 'fast'"):
        chunked_cross_entropy(hidden, head, targets, mask, kernel="fast")


@native
@pytest.mark.parametrize("head_is_vd,temperature,dtype", [(True, 1.0, "float32"), (False, 0.7, "float32"),
                                                          (True, 1.3, "bfloat16")])
def test_native_token_log_probs_match_xla(head_is_vd, temperature, dtype):
    """The post-training log-prob pass on the native kernel (``kernel="cpu"``): the same log-probs and hidden
    gradients as XLA's, for a tied and an untied head and a temperature; a trained head (full fine-tuning)
    is differentiated through XLA's recomputing path and agrees too. A soft-capped head keeps XLA's passes,
    and an unknown kernel is refused."""
    from gemmax.train.objectives import token_log_probs

    hidden, head, targets, _ = _inputs(v=1003)
    dt = jnp.dtype(dtype)
    hidden, head = hidden.astype(dt), head.astype(dt)
    cot = jnp.asarray(np.random.default_rng(7).normal(size=targets.shape), jnp.float32)
    w = head if head_is_vd else head.T

    def params(e):
        return {"token_embedding": {"embeddings": e}} if head_is_vd else {"lm_head": {"kernel": e}}

    def ours(kernel, h, e, cap=None):
        return (token_log_probs(params(e), _Cfg(head_is_vd, cap), h, targets, chunk_size=4,
                                temperature=temperature, kernel=kernel) * cot).sum()

    tol = dict(rtol=1e-5, atol=1e-6) if dtype == "float32" else dict(rtol=2e-2, atol=2e-3)
    lp_x = token_log_probs(params(w), _Cfg(head_is_vd, None), hidden, targets, chunk_size=4,
                           temperature=temperature)
    lp_c = token_log_probs(params(w), _Cfg(head_is_vd, None), hidden, targets, chunk_size=4,
                           temperature=temperature, kernel="cpu")
    np.testing.assert_allclose(lp_c, lp_x, **tol)
    for argnums in (0, (0, 1)):
        g_x = jax.jit(jax.grad(lambda h, e: ours("xla", h, e), argnums=argnums))(hidden, w)
        g_c = jax.jit(jax.grad(lambda h, e: ours("cpu", h, e), argnums=argnums))(hidden, w)
        for a, b in zip(jax.tree_util.tree_leaves(g_c), jax.tree_util.tree_leaves(g_x), strict=True):
            assert float(jnp.abs(b.astype(jnp.float32)).max()) > 1e-3
            np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), **tol)
    hlo = jax.jit(jax.grad(lambda h: ours("cpu", h, w))).lower(hidden).as_text()
    assert "gemmax_cpu_softmax_xent" in hlo
    assert ("gemmax_cpu_gemv" in hlo) == head_is_vd
    capped = jax.jit(jax.grad(lambda h: ours("cpu", h, w, cap=3.0))).lower(hidden).as_text()
    assert "gemmax_cpu_softmax_xent" not in capped
    with pytest.raises(ValueError, match="unknown log-prob kernel 'fast'"):
        token_log_probs(params(w), _Cfg(head_is_vd, None), hidden, targets, kernel="fast")


@native
def test_native_softmax_in_place_gradient():
    """``softmax_xent(in_place=True)`` writes the float32 gradient over the logits' buffer (the custom call
    aliases its output to the logits) with the same numbers as a separate output, and XLA keeps the
    logits intact for a caller that still reads them after the call (it copies them first)."""
    from gemmax.kernels import cpu as cpu_kernels

    rng = np.random.default_rng(11)
    logits = jnp.asarray(rng.normal(size=(6, 1003)) * 3, jnp.float32)
    y = jnp.asarray(rng.integers(0, 1003, 6), jnp.int32)
    w = jnp.asarray(rng.uniform(0.5, 2.0, 6), jnp.float32)

    def run(in_place):
        return jax.jit(lambda z: (z * 1.0, cpu_kernels.softmax_xent(z * 1.0, y, w, jnp.float32,
                                                                       in_place=in_place)))(logits)

    (_, (t0, h0, g0)), (z1, (t1, h1, g1)) = run(False), run(True)
    np.testing.assert_array_equal(g1, g0)
    np.testing.assert_array_equal(t1, t0)
    np.testing.assert_array_equal(h1, h0)
    np.testing.assert_array_equal(z1, logits)  # still read after the in-place call
    p = jax.nn.softmax(logits, axis=-1)
    want = w[:, None] * (p - jax.nn.one_hot(y, 1003))
    np.testing.assert_allclose(g1, want, rtol=1e-5, atol=1e-7)
    lowered = jax.jit(lambda z: cpu_kernels.softmax_xent(z, y, w, jnp.float32, in_place=True)[2]).lower(logits)
    assert "output_operand_alias" in lowered.as_text() or "output_to_operand_aliasing" in lowered.as_text()
