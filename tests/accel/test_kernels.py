"""The fused CPU kernels (tuneforge/accel/kernels): built with the system's compiler, the same numbers
as the PyTorch ops they replace, and a clean fallback when they cannot be built."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from tuneforge.accel import fused, kernels
from tuneforge.accel.fast_dropout import drop_indices, zero_at, zero_at_

from ..conftest import ROOT


@pytest.fixture(scope="module")
def ops():
    if kernels.compiler() is None:
        pytest.skip("no C++ compiler on this machine")
    assert kernels.available(), "the kernels did not build"
    return torch.ops.tuneforge


def test_a_built_library_is_reused_not_recompiled(ops):
    path = kernels.library_path()
    assert path.exists() and path.suffix == ".so"
    before = path.stat().st_mtime_ns
    assert kernels.build() == path
    assert path.stat().st_mtime_ns == before  # no second compile replaced it


@pytest.mark.parametrize("shape", [(3, 7, 40), (1, 4099), (5, 3, 2 * 32768 + 17)])
def test_swiglu_matches_torch_bit_for_bit(ops, shape):
    """The same formula and the same Sleef exponential as torch's silu: identical floats, also
    in the scalar tail (odd sizes) and across parallel chunks (over 32768 elements)."""
    torch.manual_seed(0)
    gate, up, grad = torch.randn(shape) * 4, torch.randn(shape), torch.randn(shape)
    assert torch.equal(ops.swiglu_forward(gate, up), F.silu(gate) * up)
    d_gate, d_up = ops.swiglu_backward(grad, gate, up)
    assert torch.equal(d_up, grad * F.silu(gate))
    ref = torch.ops.aten.silu_backward(grad * up, gate)
    torch.testing.assert_close(d_gate, ref, rtol=2e-6, atol=1e-7)  # a different factoring


@pytest.mark.parametrize("n", [576, 97])
def test_rms_norm_matches_float64(ops, n):
    torch.manual_seed(1)
    x, w, grad = torch.randn(33, n) * 3, torch.randn(n), torch.randn(33, n)
    out, rstd = ops.rms_norm_forward(x, w, 1e-5)
    x64, w64 = x.double().requires_grad_(), w.double()
    ref = w64 * x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5)
    (ref * grad.double()).sum().backward()
    assert rstd.shape == (33, 1)
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-6, atol=1e-6)
    dx = ops.rms_norm_backward(grad, x, w, rstd)
    torch.testing.assert_close(dx.double(), x64.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scale", [1.0, 1 / 0.95])
def test_zero_at_matches_index_put(ops, scale):
    torch.manual_seed(2)
    x = torch.randn(5, 40_000)  # 200k elements: several parallel chunks
    idx = drop_indices(x.numel(), 0.05, x.device)
    idx = torch.cat([torch.tensor([0]), idx[(idx > 0) & (idx < x.numel() - 1)],
                     torch.tensor([x.numel() - 1])])  # fmt: skip
    ref = (x * scale).view(-1).index_put_((idx,), torch.tensor(0.0)).view_as(x)
    out = ops.zero_at(x, idx, scale)
    assert torch.equal(out, ref)
    assert out.data_ptr() != x.data_ptr()
    y = x.clone()
    assert ops.zero_at_(y, idx).data_ptr() == y.data_ptr()
    assert torch.equal(y, x.view(-1).index_put((idx,), torch.tensor(0.0)).view_as(x))
    # no positions: a plain copy
    assert torch.equal(ops.zero_at(x, torch.empty(0, dtype=torch.int64), 1.0), x)


def test_lora_products_with_the_dropped_input_without_a_copy(ops):
    """x @ A.T and dh.T @ x corrected for the dropped elements equal the products with the
    dropped copy (to float rounding), including drops in the first and last element."""
    torch.manual_seed(3)
    x, a, d_h = torch.randn(301, 96), torch.randn(8, 96), torch.randn(301, 8)
    idx = drop_indices(x.numel(), 0.1, x.device)
    idx = torch.cat([torch.tensor([0]), idx[(idx > 0) & (idx < x.numel() - 1)],
                     torch.tensor([x.numel() - 1])])  # fmt: skip
    dropped = x.view(-1).index_put((idx,), torch.tensor(0.0)).view_as(x)
    h = x @ a.t()
    assert ops.lora_drop_product_(h, x, a, idx) is h  # in place
    torch.testing.assert_close(h, dropped @ a.t(), rtol=1e-5, atol=1e-5)
    da = ops.lora_drop_grad_(d_h.t() @ x, d_h, x, idx)
    torch.testing.assert_close(da, d_h.t() @ dropped, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(d_h.t() @ x, d_h.t() @ dropped)  # the correction mattered
    with pytest.raises(RuntimeError, match="not \\[tokens, in\\] for A"):
        ops.lora_drop_product_(h, x, torch.randn(8, 95), idx)


def _sdpa_per_sample(q, k, v, lens, scale):
    """The reference: causal SDPA on each sample alone, [tokens, heads, D] in and out."""
    outs = []
    for qs, ks, vs in zip(q.split(lens), k.split(lens), v.split(lens), strict=True):
        o = F.scaled_dot_product_attention(
            *(t.transpose(0, 1)[None] for t in (qs, ks, vs)),
            is_causal=True, enable_gqa=True, scale=scale,
        )  # fmt: skip
        outs.append(o[0].transpose(0, 1))
    return torch.cat(outs)


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """[tokens, heads, D] in the layouts the kernel meets: a view of a [tokens, heads * D]
    projection, head-major memory, and a slice of wider rows (head stride above D)."""
    T, H, D = t.shape
    if layout == "projection":
        return t.reshape(T, H * D).view(T, H, D)
    if layout == "head-major":
        return t.transpose(0, 1).contiguous().transpose(0, 1)
    wide = torch.zeros(T, H, D + 7, dtype=t.dtype)
    wide[..., 3 : 3 + D] = t
    return wide[..., 3 : 3 + D]


@pytest.mark.parametrize(
    "heads,kv_heads,D,layout",
    [(9, 3, 64, "projection"), (4, 4, 40, "head-major"), (6, 2, 16, "padded")],
)
def test_varlen_attention_matches_sdpa_per_sample_in_float64(ops, heads, kv_heads, D, layout):
    """Values, log-sum-exp and all three gradients against float64 SDPA per sample: query heads
    sharing a KV head (stacked in the kernel) and not, a one-token sample, samples of one and of
    several 64-token blocks, a head_dim that is not a multiple of the vector width, and q, k, v
    in three memory layouts."""
    if not ops.has_blas():
        pytest.skip("this PyTorch exports no BLAS")
    torch.manual_seed(4)
    lens = [37, 1, 200, 64, 129, 65]
    T, scale = sum(lens), D**-0.5
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(T, heads, D, dtype=torch.float64)
    k, v = (torch.randn(T, kv_heads, D, dtype=torch.float64) for _ in "kv")
    grad = torch.randn(T, heads, D, dtype=torch.float64)
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = _sdpa_per_sample(*ref_in, lens, scale)
    ref.backward(grad)
    q32, k32, v32 = (_layout(t.float(), layout) for t in (q, k, v))
    assert layout == "projection" or not q32.is_contiguous()
    out, lse = ops.varlen_attention_forward(q32, k32, v32, cu, scale)
    assert out.shape == (T, heads, D) and lse.shape == (T, heads)
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    ref_lse = []  # log-sum-exp over each query's causal keys, per sample
    kk = k.repeat_interleave(heads // kv_heads, 1)
    for qs, ks in zip(q.split(lens), kk.split(lens), strict=True):
        scores = torch.einsum("thd,shd->hts", qs, ks) * scale
        causal = torch.ones(len(qs), len(qs), dtype=torch.bool).tril()
        ref_lse.append(scores.masked_fill(~causal, float("-inf")).logsumexp(-1).t())
    torch.testing.assert_close(lse.double(), torch.cat(ref_lse), rtol=1e-5, atol=1e-5)
    grads = ops.varlen_attention_backward(grad.float(), q32, k32, v32, out, lse, cu, scale)
    for got, t in zip(grads, ref_in, strict=True):
        assert got.shape == t.shape
        torch.testing.assert_close(got.double(), t.grad, rtol=1e-5, atol=2e-5)


def test_varlen_attention_is_the_same_on_any_number_of_threads(ops):
    """Each task writes only its own sample and heads (no sums across threads), so the dynamic
    schedule cannot change a bit: exact resume needs the same numbers on 1 and 2 threads."""
    if not ops.has_blas():
        pytest.skip("this PyTorch exports no BLAS")
    torch.manual_seed(6)
    lens = [150, 7, 300, 90]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    q, grad = torch.randn(547, 6, 32), torch.randn(547, 6, 32)
    k, v = torch.randn(547, 2, 32), torch.randn(547, 2, 32)
    results = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out, lse = ops.varlen_attention_forward(q, k, v, cu, 0.2)
            results.append(
                (out, lse, *ops.varlen_attention_backward(grad, q, k, v, out, lse, cu, 0.2))
            )
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_varlen_attention_refuses_bad_boundaries(ops):
    if not ops.has_blas():
        pytest.skip("this PyTorch exports no BLAS")
    q, k = torch.randn(10, 2, 8), torch.randn(10, 1, 8)
    for cu, match in (([0, 4, 9], "from 0 to the tokens"), ([0, 4, 4, 10], "increasing"),
                      ([10], "at least 2")):  # fmt: skip
        with pytest.raises(RuntimeError, match=match):
            ops.varlen_attention_forward(q, k, k, torch.tensor(cu), 1.0)
    k2 = torch.randn(10, 2, 8)
    with pytest.raises(RuntimeError, match="kv_heads dividing"):
        ops.varlen_attention_forward(torch.randn(10, 3, 8), k2, k2, torch.tensor([0, 10]), 1.0)
    # rows closer than head_dim (expanded): BLAS would refuse them and return nothing
    with pytest.raises(RuntimeError, match="token stride of at least head_dim"):
        ops.varlen_attention_forward(q, k[:1].expand(10, 1, 8), k, torch.tensor([0, 10]), 1.0)


def test_varlen_attention_one_token_with_any_stride(ops):
    """A one-token tensor's token stride is arbitrary (here 8 < head_dim): one key, so the
    output is its value, softmax of one score."""
    if not ops.has_blas():
        pytest.skip("this PyTorch exports no BLAS")
    q = torch.randn(1, 2, 16)
    k, v = (torch.randn(1, 1, 16).as_strided((1, 1, 16), (8, 16, 1)) for _ in "kv")
    out, _ = ops.varlen_attention_forward(q, k, v, torch.tensor([0, 1]), 0.25)
    torch.testing.assert_close(out, v.expand(1, 2, 16))


def test_bad_inputs_are_refused_not_written(ops):
    x = torch.randn(10)
    with pytest.raises(RuntimeError, match="out of range"):
        ops.zero_at_(x, torch.tensor([3, 10]))
    with pytest.raises(RuntimeError, match="float32"):
        ops.swiglu_forward(x.double(), x.double())
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.swiglu_forward(torch.randn(4, 6).t(), torch.randn(6, 4))


def test_callers_take_the_kernels_only_where_they_apply(ops, monkeypatch):
    """float32 contiguous CPU tensors go to the kernels; other dtypes and kernels.disabled()
    take the PyTorch ops, with the same results."""
    calls = []

    class Spy:  # records which kernels run, then runs them
        def __getattr__(self, name):
            return lambda *a: calls.append(name) or getattr(ops, name)(*a)

    x = torch.randn(64, 48)
    idx = drop_indices(x.numel(), 0.1, x.device)
    expected = x.view(-1).index_put((idx,), torch.tensor(0.0)).view_as(x)
    monkeypatch.setattr(torch.ops, "tuneforge", Spy(), raising=False)
    assert torch.equal(zero_at(x, idx), expected) and calls == ["zero_at"]
    assert torch.equal(zero_at(x.t().contiguous().t(), idx), expected)  # made contiguous first
    assert calls == ["zero_at"] * 2
    assert torch.equal(zero_at(x.double(), idx), expected.double()) and len(calls) == 2
    g, u = torch.randn(6, 8), torch.randn(6, 8)
    assert torch.equal(fused.swiglu(g, u), F.silu(g) * u) and calls[-1] == "swiglu_forward"
    with kernels.disabled():
        assert torch.equal(zero_at(x, idx), expected)
        assert torch.equal(zero_at_(x.clone(), idx), expected)
        assert torch.equal(fused.swiglu(g, u), F.silu(g) * u)
    assert len(calls) == 3


def _run(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**os.environ, "PYTHONPATH": str(ROOT / "src"), **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


CHECK = """
    import warnings
    import torch, torch.nn.functional as F
    from tuneforge.accel import fused, kernels
    g, u = torch.randn(6, 8), torch.randn(6, 8)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = fused.swiglu(g, u)
    print(kernels.available(), torch.equal(out, F.silu(g) * u), [str(x.message) for x in w])
"""


def test_turned_off_by_environment(tmp_path):
    r = _run(CHECK, TUNEFORGE_KERNELS="0", TUNEFORGE_CACHE=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False True []"
    assert not (tmp_path / "kernels").exists()  # nothing was built


def test_a_failed_build_warns_once_and_training_code_still_runs(tmp_path):
    """A compiler that fails (CXX=/bin/false): one warning, then the PyTorch path with the
    right values, and no half-written library left in the cache."""
    r = _run(CHECK, CXX="/bin/false", TUNEFORGE_CACHE=str(tmp_path))
    assert r.returncode == 0, r.stderr
    available, equal, warned = r.stdout.strip().split(" ", 2)
    assert (available, equal) == ("False", "True")
    assert warned.count("fused CPU kernels unavailable (compiling cpu_kernels.cpp failed") == 1
    assert list(tmp_path.rglob("*.so")) == []


def test_an_unwritable_cache_only_warns(tmp_path):
    """`make install` runs `python -m tuneforge.accel.kernels`: a cache it cannot write is one line and
    exit 0, and training code then takes the PyTorch path."""
    cache = tmp_path / "not-a-folder"
    cache.write_text("")  # a file where the cache folder should be
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "TUNEFORGE_CACHE": str(cache)}
    r = subprocess.run(
        [sys.executable, "-m", "tuneforge.accel.kernels"], env=env, capture_output=True, text=True
    )
    assert r.returncode == 0 and r.stdout == ""
    assert r.stderr.startswith("tuneforge: fused CPU kernels not built:")
    r = _run(CHECK, TUNEFORGE_CACHE=str(cache))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("False True [") and "fused CPU kernels unavailable" in r.stdout
