"""Every bad input to attention_metrics raises a clear ValueError/TypeError naming the argument."""
import pytest
import torch

import rhythm
from tests.oracle_check import random_qkv


@pytest.fixture
def qkv():
    return random_qkv(2, 4, 2, 16, 8, with_v=True)


def _call(q, k, v=None, **kwargs):
    return rhythm.attention_metrics(q, k, v, backend="torch", **kwargs)


def test_wrong_rank(qkv):
    q, k, _ = qkv
    with pytest.raises(ValueError, match=r"q must have rank 4"):
        _call(q[0], k)


def test_not_a_tensor(qkv):
    _, k, _ = qkv
    with pytest.raises(TypeError, match=r"q must be a torch.Tensor"):
        _call([[1.0]], k)


def test_heads_not_multiple(qkv):
    q, _, _ = qkv
    k = torch.randn(2, 3, 16, 8)
    with pytest.raises(ValueError, match=r"multiple of the key heads"):
        _call(q, k)


@pytest.mark.parametrize("shape", [(3, 2, 16, 8), (2, 2, 15, 8), (2, 2, 16, 4)])
def test_mismatched_batch_length_dim(qkv, shape):
    q, _, _ = qkv
    with pytest.raises(ValueError, match=r"k must have shape"):
        _call(q, torch.randn(*shape))


@pytest.mark.parametrize("shape", [(2, 1, 16, 8), (2, 2, 15, 8), (1, 2, 16, 8), (2, 2, 16, 0)])
def test_v_shape(qkv, shape):
    q, k, _ = qkv
    with pytest.raises(ValueError, match=r"v must have"):
        _call(q, k, torch.randn(*shape))


def test_v_head_dim_may_differ(qkv):
    """MLA: v's head dim Dv differs from q/k's D; out is [B, T, Hq, Dv] (values: tests/test_head_dims.py)."""
    q, k, _ = qkv
    assert _call(q, k, torch.randn(2, 2, 16, 4)).out.shape == (2, 16, 4, 4)


def test_dtypes(qkv):
    q, k, _ = qkv
    with pytest.raises(TypeError, match=r"share one dtype"):
        _call(q, k.half())
    with pytest.raises(TypeError, match=r"q must be float32, float16 or bfloat16"):
        _call(q.double(), k.double())


def test_mask_not_contiguous(qkv):
    q, k, _ = qkv
    mask = torch.ones(2, 16, dtype=torch.bool)
    mask[1, 5] = False
    with pytest.raises(ValueError, match=r"attention_mask row 1 is not one contiguous span"):
        _call(q, k, attention_mask=mask)


def test_mask_empty_row(qkv):
    q, k, _ = qkv
    mask = torch.ones(2, 16, dtype=torch.bool)
    mask[0] = False
    with pytest.raises(ValueError, match=r"attention_mask row 0 has no real token"):
        _call(q, k, attention_mask=mask)


def test_mask_shape_and_values(qkv):
    q, k, _ = qkv
    with pytest.raises(ValueError, match=r"attention_mask must have shape \[B, T\]"):
        _call(q, k, attention_mask=torch.ones(2, 15))
    with pytest.raises(ValueError, match=r"attention_mask must hold only 0/1"):
        _call(q, k, attention_mask=torch.full((2, 16), 0.5))
    with pytest.raises(ValueError, match=r"attention_mask must hold only 0/1"):
        _call(q, k, attention_mask=torch.full((2, 16), 2, dtype=torch.long))


@pytest.mark.parametrize("start", [17, -1])
def test_response_start_outside_span(qkv, start):
    q, k, _ = qkv
    with pytest.raises(ValueError, match=r"response_start\[0\] = .* outside"):
        _call(q, k, response_start=start)


def test_response_start_outside_padded_span(qkv):
    q, k, _ = qkv
    mask = torch.ones(2, 16, dtype=torch.bool)
    mask[1, :6] = False
    with pytest.raises(ValueError, match=r"response_start\[1\] = 3 lies outside .*\[6, 16\]"):
        _call(q, k, attention_mask=mask, response_start=torch.tensor([3, 3]))


def test_response_start_wrong_type_or_length(qkv):
    q, k, _ = qkv
    with pytest.raises(ValueError, match=r"response_start must be an int or a 1-D tensor of length 2"):
        _call(q, k, response_start=torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match=r"response_start must hold integers"):
        _call(q, k, response_start=torch.tensor([1.0, 2.0]))


def test_cu_seqlens_errors():
    q, k, _ = random_qkv(1, 2, 2, 16, 8)
    with pytest.raises(ValueError, match=r"strictly increasing"):
        _call(q, k, cu_seqlens=torch.tensor([0, 8, 8, 16]))
    with pytest.raises(ValueError, match=r"end at T = 16"):
        _call(q, k, cu_seqlens=torch.tensor([0, 8, 12]))
    with pytest.raises(TypeError, match=r"cu_seqlens must hold integers"):
        _call(q, k, cu_seqlens=torch.tensor([0.0, 16.0]))
    with pytest.raises(ValueError, match=r"attention_mask must be None with cu_seqlens"):
        _call(q, k, cu_seqlens=torch.tensor([0, 16]), attention_mask=torch.ones(1, 16))


def test_cu_seqlens_needs_batch_one(qkv):
    q, k, _ = qkv
    with pytest.raises(ValueError, match=r"B = 1"):
        _call(q, k, cu_seqlens=torch.tensor([0, 16]))


@pytest.mark.parametrize("window", [0, -3, 2.5, True])
def test_bad_window(qkv, window):
    q, k, _ = qkv
    with pytest.raises(ValueError, match=r"window must be an int >= 1"):
        _call(q, k, window=window)


@pytest.mark.parametrize("horizon", [(5, 2), (-1, 4), (1, 2, 3), 7, (1.0, 4), (True, 4)])
def test_bad_horizon(qkv, horizon):
    q, k, _ = qkv
    with pytest.raises(ValueError, match=r"horizon must be a pair \(H_lo, H_hi\): H_lo an int >= 0, H_hi None"):
        _call(q, k, horizon=horizon)


def test_bad_scale(qkv):
    q, k, _ = qkv
    with pytest.raises(ValueError, match=r"scale must be None or a finite float > 0"):
        _call(q, k, scale=-1.0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_inf(qkv, bad):
    q, k, v = qkv
    for name in ("q", "k", "v"):
        args = {"q": q.clone(), "k": k.clone(), "v": v.clone()}
        args[name][0, 0, 3, 1] = bad
        with pytest.raises(ValueError, match=rf"{name} holds NaN or Inf values on real"):
            _call(args["q"], args["k"], args["v"])
        mask = torch.ones(2, 16, dtype=torch.bool)
        mask[0, 4:] = False                         # position 3 stays real: still refused
        with pytest.raises(ValueError, match=rf"{name} holds NaN or Inf"):
            _call(args["q"], args["k"], args["v"], attention_mask=mask)


@pytest.mark.parametrize("backend", ["torch", "reference", "triton"])
def test_nan_on_padding_is_never_read(backend):
    """validate=True checks only real positions; the result equals the one with clean padding, and fai is
    exactly 0 (never NaN) where fai_valid is False."""
    q, k, v = random_qkv(2, 4, 2, 40, 16, with_v=True, seed=8)
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[0, :7] = False           # left padding
    mask[1, 30:] = False          # right padding
    dirty = [x.clone() for x in (q, k, v)]
    for x in dirty:
        x.transpose(1, 2)[~mask] = float("nan")
        x[1, :, 35] = float("inf")
    resp = torch.tensor([20, 12])
    clean = rhythm.attention_metrics(q, k, v, attention_mask=mask, response_start=resp, backend=backend)
    got = rhythm.attention_metrics(*dirty, attention_mask=mask, response_start=resp, backend=backend)
    for name in ("lse", "distance", "waad", "fai", "fai_valid", "out"):
        assert torch.equal(getattr(got, name), getattr(clean, name)), name
    assert torch.all(got.fai[~got.fai_valid] == 0)
    assert not torch.isnan(got.out).any()


def test_inputs_as_list_and_numpy_integers(qkv):
    """attention_mask as a nested list, numpy integers for window / horizon / response_start: the same
    result as Python ints and tensors."""
    np = pytest.importorskip("numpy")
    q, k, _ = qkv
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[0, :3] = 0
    want = _call(q, k, attention_mask=mask, window=4, horizon=(1, 6), response_start=torch.tensor([5, 8]))
    variants = [
        dict(attention_mask=mask.tolist(), window=4, horizon=(1, 6), response_start=torch.tensor([5, 8])),
        dict(attention_mask=mask.numpy(), window=np.int64(4), horizon=(np.int32(1), np.int64(6)),
             response_start=np.array([5, 8])),
        dict(attention_mask=mask.bool().tolist(), window=4, horizon=[1, 6], response_start=[5, 8]),
    ]
    for kwargs in variants[:2]:
        got = _call(q, k, **kwargs)
        for name in ("lse", "distance", "waad", "fai", "fai_valid"):
            assert torch.equal(getattr(got, name), getattr(want, name)), (name, kwargs)
    with pytest.raises(TypeError, match="response_start must be None, an int or an integer tensor, got list"):
        _call(q, k, **variants[2])
    single = _call(q, k, response_start=np.int64(5))
    assert torch.equal(single.fai, _call(q, k, response_start=5).fai)
    with pytest.raises(TypeError, match="attention_mask must be a \\[B, T\\] tensor"):
        _call(q, k, attention_mask=[[1, 1], [1]])
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        _call(q, k, attention_mask=[1] * 16)
    with pytest.raises(TypeError, match="response_start must hold integers"):
        _call(q, k, response_start=np.array([1.0, 2.0]))
    for bad in (np.bool_(True), True):
        with pytest.raises(TypeError, match="response_start"):
            _call(q, k, response_start=bad)
        with pytest.raises(ValueError, match="window must be an int >= 1"):
            _call(q, k, window=bad)


@pytest.mark.parametrize("backend", ["torch", "reference", "triton"])
def test_inputs_that_require_grad(backend):
    """Forward only in every backend: no crash, the values of the detached call, nothing tracks gradients
    (out included), and the inputs' graphs are left alone."""
    q, k, v = random_qkv(1, 4, 2, 24, 16, with_v=True, seed=6)
    sinks = torch.zeros(4, requires_grad=True)
    want = rhythm.attention_metrics(q, k, v, backend=backend)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    got = rhythm.attention_metrics(*[x * 1 for x in leaves], backend=backend)
    for name in ("lse", "distance", "waad", "fai", "out"):
        value = getattr(got, name)
        assert not value.requires_grad and value.grad_fn is None, name
        assert torch.equal(value, getattr(want, name)), name
    assert all(x.grad is None for x in leaves)
    with_sinks = rhythm.attention_metrics(*leaves, backend=backend, layer=rhythm.LayerAttention(sinks=sinks))
    assert not with_sinks.out.requires_grad and not with_sinks.lse.requires_grad


def test_unknown_backend(qkv):
    q, k, _ = qkv
    with pytest.raises(ValueError, match=r"backend must be one of"):
        rhythm.attention_metrics(q, k, backend="cuda-magic")


def test_device_mismatch(qkv):
    q, k, _ = qkv
    with pytest.raises(ValueError, match=r"q, k and v must be on one device"):
        _call(q, k.to("meta"))
    with pytest.raises(ValueError, match=r"attention_mask must be on the device of q"):
        _call(q, k, attention_mask=torch.ones(2, 16, device="meta"))


def test_prebuilt_segments(qkv):
    """segments= replaces the mask arguments, gives the same metrics, and must fit q."""
    from rhythm_kernels.segments import segments_from_mask

    q, k, _ = qkv
    mask = torch.ones(2, 16, dtype=torch.bool)
    mask[1, :4] = False
    resp = torch.tensor([5, 9])
    segments = segments_from_mask(mask, 2, 16, resp, q.device)
    via_mask = _call(q, k, attention_mask=mask, response_start=resp)
    via_segments = _call(q, k, segments=segments)
    for name in ("lse", "distance", "waad", "fai", "fai_valid"):
        assert torch.equal(getattr(via_mask, name), getattr(via_segments, name)), name
    with pytest.raises(ValueError, match=r"segments replaces attention_mask"):
        _call(q, k, segments=segments, attention_mask=mask)
    with pytest.raises(ValueError, match=r"segments\[0\] .* does not fit q with B = 2, T = 12"):
        _call(q[:, :, :12], k[:, :, :12], segments=segments)
    with pytest.raises(TypeError, match=r"segments must be a rhythm_kernels.segments.Segments"):
        _call(q, k, segments=[(0, 0, 16, 0)])
