"""Credit multipliers and shaped advantages (docs/definitions.md sections 4 and 8): hand-worked examples, edge cases,
agreement with a plain per-sequence loop (also as a hypothesis property), invariants and bad inputs."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rhythm import credit_multipliers, rhythm_selection, shape_advantages

from tests.oracle_check import random_baseline

STRATEGIES = ["local", "global", "coupled", "random", "entropy"]


# ---- the per-sequence reference: a plain Python re-implementation of docs/definitions.md section 4 -------

def reference_selection(waad, fai, mask, fai_valid=None, q=0.4, k=3):
    """One row at a time with Python lists. Returns per row (T_loc, T_glob, D, I(D)) as sets of positions."""
    out = []
    for b in range(mask.shape[0]):
        R = [t for t in range(mask.shape[1]) if mask[b, t]]
        r_set = set(R)
        # Signals are compared in float32, float64 ones in float64 (Python floats).
        cast = float if waad.dtype == torch.float64 else np.float32
        w = [cast(x) for x in waad[b].tolist()]
        # Delta_t = |WAAD_t - WAAD_{t+1}| in that precision, undefined on the last response token.
        delta = {t: float(np.abs(w[t] - w[t + 1])) for t in R[:-1]}

        def top(scores):   # ceil(q * n) in float64, largest first, ties to the lower position
            count = math.ceil(q * len(scores))
            return set(sorted(scores, key=lambda t: (-scores[t], t))[:count])

        t_loc = top(delta)
        tau_delta = min((delta[t] for t in t_loc), default=math.inf)
        valid = [t for t in R if fai_valid is None or fai_valid[b, t]]
        t_glob = top({t: float(fai[b, t]) for t in valid})
        tau_waad = sorted(float(w[t]) for t in R)[(len(R) - 1) // 2] if R else 0.0
        dominated, intro = set(), set()
        for t in t_glob:
            window = [u for u in range(t - k, t) if u in r_set]
            if not window:
                continue   # no response token to look back on: not dominated
            if float(w[t]) <= tau_waad and max(delta[u] for u in window) >= tau_delta:
                dominated.add(t)
                intro.add(max(window, key=lambda u: (delta[u], u)))   # argmax, latest on ties
        out.append((t_loc, t_glob, dominated, intro))
    return out


def reference_gamma(waad, fai, mask, strategy, fai_valid=None, entropy=None, q=0.4, gamma_amp=1.5,
                    alpha=0.5, k=3, seed=0):
    batch, length = mask.shape
    gamma = [[1.0] * length for _ in range(batch)]
    amp = gamma_amp - 1
    for b, (t_loc, t_glob, dom, intro) in enumerate(reference_selection(waad, fai, mask, fai_valid, q, k)):
        R = [t for t in range(length) if mask[b, t]]
        if strategy == "local":
            for t in t_loc:
                gamma[b][t] += amp
        elif strategy == "global":
            for t in t_glob:
                gamma[b][t] += amp
        elif strategy == "coupled":
            for t in t_glob - dom:
                gamma[b][t] += amp
            for t in dom:
                gamma[b][t] += (1 - alpha) * amp
            for t in intro:
                gamma[b][t] += alpha * amp
        elif strategy == "random":   # the documented draw, row id b, the sequence starting at column 0
            if R:
                gamma[b][R[0]:R[-1] + 1] = random_baseline(seed, b, R[0], len(R), q, gamma_amp)
        else:
            for t in sorted(R, key=lambda t: (-float(entropy[b][t]), t))[:math.ceil(q * len(R))]:
                gamma[b][t] += amp
    return torch.tensor(gamma, dtype=torch.float32)


def _batch(rows, length):
    """rows: (start, end) of each row's response on [0, length) (left padding/prompt before, padding after)."""
    mask = torch.zeros(len(rows), length, dtype=torch.bool)
    for b, (lo, hi) in enumerate(rows):
        mask[b, lo:hi] = True
    return mask


# ---- hand-worked examples ------------------------------------------------------------------------------------

# Positions 0..1 prompt, 2..9 response. WAAD 1 5 2 2 9 1 0 3 -> Delta at 2..8 = 4 3 0 7 8 1 3.
# T_loc = {2, 5, 6} (Delta 4, 7, 8; ceil(0.4 * 7) = 3). T_glob = {2, 7, 8, 9} (FAI top ceil(0.4 * 8) = 4).
# tau_waad = 2, tau_delta = 4; D = {7, 8} (WAAD 1, 0 <= 2, window max 8 >= 4), intro(7) = intro(8) = 6;
# anchor 2 has no response token before it, anchor 9 has WAAD 3 > 2.
HAND_WAAD = torch.tensor([[0., 0., 1., 5., 2., 2., 9., 1., 0., 3.]])
HAND_FAI = torch.tensor([[0.9, 0.9, 0.5, 0.1, 0.1, 0.2, 0.1, 0.6, 0.7, 0.8]])
HAND_MASK = _batch([(2, 10)], 10)


def test_hand_local():
    # gamma = 1.5 on T_loc = {2, 5, 6}.
    gamma = credit_multipliers(HAND_WAAD, HAND_FAI, HAND_MASK, strategy="local")
    assert gamma.tolist() == [[1, 1, 1.5, 1, 1, 1.5, 1.5, 1, 1, 1]]


def test_hand_global():
    # gamma = 1.5 on T_glob = {2, 7, 8, 9}; the prompt's high FAI (0.9 at 0, 1) never counts.
    gamma = credit_multipliers(HAND_WAAD, HAND_FAI, HAND_MASK, strategy="global")
    assert gamma.tolist() == [[1, 1, 1.5, 1, 1, 1, 1, 1.5, 1.5, 1.5]]


def test_hand_coupled():
    # T_glob \ D = {2, 9} -> 1.5; D = {7, 8} -> 1 + (1 - 0.5) * 0.5 = 1.25; I(D) = {6} -> 1 + 0.5 * 0.5 = 1.25.
    gamma = credit_multipliers(HAND_WAAD, HAND_FAI, HAND_MASK, strategy="coupled")
    assert gamma.dtype == torch.float32
    assert gamma.tolist() == [[1, 1, 1.5, 1, 1, 1, 1.25, 1.25, 1.25, 1.5]]
    # alpha = 0: dominated anchors keep the full amplification, intro tokens get nothing.
    gamma = credit_multipliers(HAND_WAAD, HAND_FAI, HAND_MASK, strategy="coupled", alpha=0.0)
    assert gamma.tolist() == [[1, 1, 1.5, 1, 1, 1, 1, 1.5, 1.5, 1.5]]
    # alpha = 1, gamma_amp = 2: D -> 1 + 0 = 1, intro 6 -> 1 + 1 * 1 = 2.
    gamma = credit_multipliers(HAND_WAAD, HAND_FAI, HAND_MASK, strategy="coupled", alpha=1.0, gamma_amp=2.0)
    assert gamma.tolist() == [[1, 1, 2, 1, 1, 1, 2, 1, 1, 2]]


def test_hand_coupled_intro_is_also_an_anchor():
    # Additive terms: an intro token that is itself a non-dominated anchor gets (1 + alpha)(gamma_amp - 1).
    # Response 0..5, WAAD 0 0 4 4 0 0 -> Delta at 0..4 = 0 4 0 4 0; T_loc (ceil(0.4*5) = 2) = {1, 3},
    # tau_delta = 4. FAI: T_glob (ceil(0.4*6) = 3) = {1, 3, 4}. tau_waad = sorted 0 0 0 0 4 4 [2] = 0.
    # Anchor 1: WAAD 0 <= 0, window {0} max Delta 0 < 4 -> not dominated. Anchor 3: WAAD 4 > 0 -> not.
    # Anchor 4: WAAD 0, window {1, 2, 3} Delta 4 0 4 -> dominated, intro = 3 (latest of the tie).
    # gamma: 1 -> 1.5; 3 -> 1.5 + 0.25 = 1.75; 4 -> 1.25.
    waad = torch.tensor([[0., 0., 4., 4., 0., 0.]])
    fai = torch.tensor([[0., 0.9, 0., 0.8, 0.7, 0.]])
    gamma = credit_multipliers(waad, fai, _batch([(0, 6)], 6), strategy="coupled")
    assert gamma.tolist() == [[1, 1.5, 1, 1.75, 1.25, 1]]


def test_hand_random_and_entropy():
    mask = _batch([(1, 6)], 8)   # |R| = 5 -> ceil(0.4 * 5) = 2 tokens
    gamma = credit_multipliers(None, None, mask, strategy="random", seed=3)
    assert (gamma == 1.5).sum().item() == 2 and not (gamma[~mask] != 1).any()
    assert gamma[0, 1:6].tolist() == random_baseline(3, 0, 1, 5)
    # Entropy 5 4 3 2 1 on 1..5 (the 9s are prompt/padding): the two largest are positions 1, 2.
    entropy = torch.tensor([[9., 5., 4., 3., 2., 1., 9., 9.]])
    gamma = credit_multipliers(None, None, mask, strategy="entropy", entropy=entropy, gamma_amp=2.0)
    assert gamma.tolist() == [[1, 2, 2, 1, 1, 1, 1, 1]]


# ---- edge cases ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("strategy", STRATEGIES)
def test_edge_rows(strategy):
    # Row 0: empty response. Row 1: one response token (no Delta: T_loc empty). Row 2: two tokens at the very
    # end. Row 3: left padding 0..2, prompt 3..4, response 5..8, right padding 9..11. Row 4: whole row.
    length = 12
    mask = _batch([(4, 4), (6, 7), (10, 12), (5, 9), (0, 12)], length)
    torch.manual_seed(0)
    waad, fai, entropy = torch.rand(5, length) * 10, torch.rand(5, length), torch.rand(5, length)
    fai_valid = torch.rand(5, length) > 0.3
    gamma = credit_multipliers(waad, fai, mask, strategy=strategy, fai_valid=fai_valid, entropy=entropy)
    expected = reference_gamma(waad, fai, mask, strategy, fai_valid=fai_valid, entropy=entropy)
    assert torch.allclose(gamma, expected, atol=1e-6, rtol=0)
    assert (gamma[0] == 1).all()                       # empty response
    assert (gamma[~mask] == 1).all()                   # off the response
    if strategy == "local":
        assert (gamma[1] == 1).all()                   # one token: n_eligible = 0
        assert gamma[2].tolist()[10:] == [1.5, 1.0]    # two tokens: Delta only on the first
    if strategy in ("random", "entropy"):
        assert gamma[1, 6].item() == 1.5               # ceil(0.4 * 1) = 1


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_all_equal_signals(strategy):
    # Every Delta is 0, every FAI equal: the lowest positions win every tie; tau_delta = 0, every WAAD equals
    # the median, so every anchor with a response token before it is dominated (Delta 0 >= 0).
    mask = _batch([(2, 9)], 10)
    ones = torch.ones(1, 10)
    gamma = credit_multipliers(ones, ones * 0.5, mask, strategy=strategy, entropy=ones)
    assert torch.allclose(gamma, reference_gamma(ones, ones * 0.5, mask, strategy, entropy=ones), atol=1e-6)
    if strategy == "local":       # ceil(0.4 * 6) = 3 -> positions 2, 3, 4
        assert gamma[0].tolist() == [1, 1, 1.5, 1.5, 1.5, 1, 1, 1, 1, 1]
    if strategy == "coupled":
        # T_glob = {2, 3, 4} (ceil(0.4 * 7) = 3). 2: no window -> 1.5. 3: dominated, intro 2 (only choice).
        # 4: dominated, window {2, 3} all 0 -> intro 3 (latest). gamma 2: 1.5 + 0.25; 3: 1.25 + 0.25; 4: 1.25.
        assert gamma[0].tolist() == [1, 1, 1.75, 1.5, 1.25, 1, 1, 1, 1, 1]


def test_every_fai_invalid():
    mask = _batch([(0, 8)], 8)
    waad, fai = torch.rand(1, 8), torch.rand(1, 8)
    invalid = torch.zeros(1, 8, dtype=torch.bool)
    assert (credit_multipliers(waad, fai, mask, strategy="global", fai_valid=invalid) == 1).all()
    assert (credit_multipliers(waad, fai, mask, strategy="coupled", fai_valid=invalid) == 1).all()


def test_padding_layout_does_not_matter():
    # The same response placed with left padding or right padding gets the same multipliers.
    torch.manual_seed(5)
    waad, fai = torch.rand(1, 7), torch.rand(1, 7)
    left_w, left_f = torch.cat([torch.zeros(1, 5), waad], 1), torch.cat([torch.zeros(1, 5), fai], 1)
    right_w, right_f = torch.cat([waad, torch.zeros(1, 5)], 1), torch.cat([fai, torch.zeros(1, 5)], 1)
    for strategy in ("local", "global", "coupled"):
        g_left = credit_multipliers(left_w, left_f, _batch([(5, 12)], 12), strategy=strategy)
        g_right = credit_multipliers(right_w, right_f, _batch([(0, 7)], 12), strategy=strategy)
        assert torch.equal(g_left[:, 5:], g_right[:, :7])


def test_float64_and_half_signals():
    torch.manual_seed(2)
    waad, fai = torch.rand(3, 30), torch.rand(3, 30)
    mask = _batch([(3, 30), (0, 20), (10, 11)], 30)
    w, f = waad.to(torch.bfloat16), fai.to(torch.bfloat16)   # bf16 values are exact in float32
    assert torch.equal(credit_multipliers(w, f, mask),
                       torch.tensor(reference_gamma(w.float(), f.float(), mask, "coupled")))


@pytest.mark.parametrize("strategy", ["global", "coupled"])
def test_float64_fai_is_ranked_in_float64(strategy):
    """FAI values that differ only beyond float32 precision: the float64 branch ranks them by value; a float32
    cast would tie them and pick the lower positions instead (checked, so the test can tell the two apart)."""
    length = 20
    fai = torch.full((1, length), 0.25, dtype=torch.float64)
    fai[0, 1::2] += 1e-12                               # odd positions are larger, but only in float64
    waad = torch.linspace(0, 3, length, dtype=torch.float64)[None]
    mask = torch.ones(1, length, dtype=torch.bool)
    gamma = credit_multipliers(waad, fai, mask, strategy=strategy)
    want = torch.tensor(reference_gamma(waad, fai, mask, strategy), dtype=torch.float32)
    as_fp32 = torch.tensor(reference_gamma(waad, fai.float(), mask, strategy), dtype=torch.float32)
    assert not torch.equal(want, as_fp32)
    assert torch.equal(gamma, want)
    assert gamma.dtype == torch.float32


# ---- batched vs per-sequence loop -----------------------------------------------------------------------------

@pytest.mark.parametrize("strategy", STRATEGIES)
def test_matches_loop_random_batch(strategy):
    torch.manual_seed(11)
    length = 64
    rows = [(0, 64), (10, 64), (20, 40), (63, 64), (5, 5), (30, 32), (1, 50), (0, 1)]
    mask = _batch(rows, length)
    waad = torch.randint(0, 6, (len(rows), length)).float()   # small integers: many ties
    fai = torch.randint(0, 4, (len(rows), length)).float() / 4
    fai_valid, entropy = torch.rand(len(rows), length) > 0.2, torch.rand(len(rows), length)
    for q, k in ((0.4, 3), (0.25, 1), (1.0, 5)):
        gamma = credit_multipliers(waad, fai, mask, strategy=strategy, fai_valid=fai_valid, entropy=entropy,
                                   q=q, k=k, seed=4)
        expected = reference_gamma(waad, fai, mask, strategy, fai_valid=fai_valid, entropy=entropy, q=q, k=k,
                                   seed=4)
        assert torch.allclose(gamma, expected, atol=1e-6, rtol=0), (q, k)


@st.composite
def batches(draw):
    batch, length = draw(st.integers(1, 4)), draw(st.integers(1, 20))
    rows = []
    for _ in range(batch):
        lo = draw(st.integers(0, length))
        rows.append((lo, draw(st.integers(lo, length))))
    ints = draw(st.booleans())   # integer-valued signals to force ties, or continuous ones
    elements = st.integers(0, 3).map(float) if ints else st.floats(0, 10, allow_nan=False, width=32)
    signal = st.lists(elements, min_size=batch * length, max_size=batch * length)
    waad = torch.tensor(draw(signal)).reshape(batch, length)
    fai = torch.tensor(draw(signal)).reshape(batch, length) / 10
    entropy = torch.tensor(draw(signal)).reshape(batch, length)
    fai_valid = torch.tensor(draw(st.lists(st.booleans(), min_size=batch * length,
                                           max_size=batch * length))).reshape(batch, length)
    return _batch(rows, length), waad, fai, entropy, fai_valid


@settings(max_examples=120, deadline=None)
@given(data=batches(), strategy=st.sampled_from(STRATEGIES), q=st.sampled_from([0.1, 0.3, 0.4, 0.5, 0.77, 1.0]),
       k=st.integers(1, 5), alpha=st.sampled_from([0.0, 0.3, 0.5, 1.0]), gamma_amp=st.sampled_from([1.0, 1.5, 2.0]),
       seed=st.integers(0, 3))
def test_property_matches_loop(data, strategy, q, k, alpha, gamma_amp, seed):
    mask, waad, fai, entropy, fai_valid = data
    kwargs = dict(fai_valid=fai_valid, entropy=entropy, q=q, gamma_amp=gamma_amp, alpha=alpha, k=k, seed=seed)
    gamma = credit_multipliers(waad, fai, mask, strategy=strategy, **kwargs)
    assert torch.allclose(gamma, reference_gamma(waad, fai, mask, strategy, **kwargs), atol=1e-6, rtol=0)
    # Invariants: 1 off the response, bounded on it.
    assert (gamma[~mask] == 1).all()
    assert (gamma >= 1).all() and (gamma <= 1 + (1 + alpha) * (gamma_amp - 1) + 1e-6).all()
    # The batched masks equal the loop's sets.
    if strategy == "coupled":
        s = rhythm_selection(waad, fai, mask, fai_valid, q=q, k=k)
        for b, sets in enumerate(reference_selection(waad, fai, mask, fai_valid, q, k)):
            got = [set(m[b].nonzero().flatten().tolist()) for m in (s.preplan, s.anchor, s.dominated, s.intro)]
            assert got == list(sets)


# ---- invariants -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("strategy", ["local", "global", "random", "entropy"])
def test_amplified_count(strategy):
    torch.manual_seed(3)
    length = 50
    mask = _batch([(0, 50), (7, 50), (0, 1), (20, 22), (3, 3), (10, 35)], length)
    fai_valid = torch.rand(6, length) > 0.5
    waad, fai, entropy = torch.rand(6, length), torch.rand(6, length), torch.rand(6, length)
    for q in (0.4, 0.3, 0.1, 1.0):
        gamma = credit_multipliers(waad, fai, mask, strategy=strategy, fai_valid=fai_valid, entropy=entropy, q=q)
        n_resp = mask.sum(1)
        n_eligible = {"local": (n_resp - 1).clamp(min=0), "global": (mask & fai_valid).sum(1)}.get(strategy, n_resp)
        assert (gamma > 1).sum(1).tolist() == [math.ceil(q * int(n)) for n in n_eligible]


def test_coupled_bounds():
    torch.manual_seed(4)
    mask = _batch([(0, 300), (100, 300)], 300)
    waad, fai = torch.rand(2, 300) * 10, torch.rand(2, 300)
    for alpha in (0.0, 0.5, 1.0):
        gamma = credit_multipliers(waad, fai, mask, alpha=alpha, gamma_amp=1.5)
        assert (gamma >= 1).all() and (gamma <= 1 + (1 + alpha) * 0.5).all() and (gamma[~mask] == 1).all()


# ---- shaped advantages -----------------------------------------------------------------------------------------

def test_shape_advantages_signs_and_broadcast():
    gamma = torch.tensor([[1.0, 1.5, 1.25], [2.0, 1.0, 1.5]])
    adv = torch.tensor([2.0, -1.0])
    assert shape_advantages(adv, gamma).tolist() == [[2, 3, 2.5], [-2, -1, -1.5]]
    assert torch.equal(shape_advantages(adv[:, None], gamma), shape_advantages(adv, gamma))
    # positive: only the A >= 0 row is scaled; negative: only the A < 0 row.
    assert shape_advantages(adv, gamma, sign="positive").tolist() == [[2, 3, 2.5], [-1, -1, -1]]
    assert shape_advantages(adv, gamma, sign="negative").tolist() == [[2, 2, 2], [-2, -1, -1.5]]
    per_token = torch.tensor([[1.0, -1.0, 0.0], [-2.0, 2.0, 4.0]])
    assert shape_advantages(per_token, gamma, sign="positive").tolist() == [[1, -1, 0], [-2, 2, 6]]


def test_shape_advantages_detaches_gamma_and_keeps_dtype():
    gamma = torch.full((2, 3), 1.5, requires_grad=True)
    adv = torch.tensor([1.0, -1.0], requires_grad=True)
    out = shape_advantages(adv, gamma)
    out.sum().backward()
    assert gamma.grad is None and adv.grad.tolist() == [4.5, 4.5]
    assert shape_advantages(adv.detach().bfloat16(), gamma.detach()).dtype == torch.bfloat16


# ---- bad inputs: one test each -----------------------------------------------------------------------------------

W, F, M = torch.rand(2, 6), torch.rand(2, 6), torch.ones(2, 6, dtype=torch.bool)


def test_bad_shape_mismatch():
    with pytest.raises(ValueError, match="fai must have the shape"):
        credit_multipliers(W, torch.rand(2, 5), M)


def test_bad_q():
    for q in (0.0, 1.5, -0.1, True):
        with pytest.raises(ValueError, match="q must"):
            credit_multipliers(W, F, M, q=q)


def test_bad_gamma_amp():
    with pytest.raises(ValueError, match="gamma_amp"):
        credit_multipliers(W, F, M, gamma_amp=0.9)


def test_bad_alpha():
    for alpha in (-0.1, 1.1):
        with pytest.raises(ValueError, match="alpha"):
            credit_multipliers(W, F, M, alpha=alpha)


def test_bad_k():
    for k in (0, 2.0):
        with pytest.raises(ValueError, match="k must"):
            credit_multipliers(W, F, M, k=k)


def test_bad_strategy():
    with pytest.raises(ValueError, match="strategy"):
        credit_multipliers(W, F, M, strategy="anchor")


def test_entropy_missing():
    with pytest.raises(ValueError, match="entropy"):
        credit_multipliers(W, F, M, strategy="entropy")


def test_response_mask_not_bool():
    with pytest.raises(TypeError, match="response_mask"):
        credit_multipliers(W, F, M.long())


def test_response_mask_not_contiguous():
    with pytest.raises(ValueError, match="contiguous"):
        credit_multipliers(W, F, torch.tensor([[True, True, False, True, False, False]] * 2))


def test_signal_not_float_or_not_finite():
    with pytest.raises(TypeError, match="waad"):
        credit_multipliers(torch.ones(2, 6, dtype=torch.long), F, M)
    with pytest.raises(ValueError, match="fai holds NaN"):
        credit_multipliers(W, torch.full((2, 6), float("nan")), M)


@pytest.mark.parametrize("strategy", ["global", "coupled"])
def test_fai_ignored_where_invalid(strategy):
    """fai where fai_valid is False is never read: NaN there gives the gamma of finite values; NaN on a valid
    response position is refused."""
    valid = M.clone()
    valid[:, -2:] = False
    nan_fai = F.clone()
    nan_fai[~valid] = float("nan")
    want = credit_multipliers(W, F, M, strategy=strategy, fai_valid=valid)
    assert torch.equal(credit_multipliers(W, nan_fai, M, strategy=strategy, fai_valid=valid), want)
    nan_fai[valid] = float("nan")
    with pytest.raises(ValueError, match="fai holds NaN or Inf on fai_valid response positions"):
        credit_multipliers(W, nan_fai, M, strategy=strategy, fai_valid=valid)


def test_fai_valid_not_bool():
    with pytest.raises(TypeError, match="fai_valid"):
        credit_multipliers(W, F, M, fai_valid=torch.ones(2, 6))


def test_missing_signal_for_strategy():
    with pytest.raises(ValueError, match="waad is required"):
        credit_multipliers(None, F, M, strategy="local")


def test_bad_sign():
    with pytest.raises(ValueError, match="sign"):
        shape_advantages(torch.ones(2), torch.ones(2, 6), sign="pos")


def test_bad_advantages_shape():
    with pytest.raises(ValueError, match="advantages"):
        shape_advantages(torch.ones(3), torch.ones(2, 6))
    with pytest.raises(TypeError, match="advantages"):
        shape_advantages(torch.ones(2, dtype=torch.long), torch.ones(2, 6))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_cpu_row_chunking_is_invisible(strategy, monkeypatch):
    import rhythm.credit.gamma as credit

    torch.manual_seed(6)
    mask = _batch([(0, 40), (5, 30), (39, 40), (7, 7), (2, 40)], 40)
    waad, fai, entropy = torch.rand(5, 40), torch.rand(5, 40), torch.rand(5, 40)
    fai_valid = torch.rand(5, 40) > 0.2
    kwargs = dict(strategy=strategy, fai_valid=fai_valid, entropy=entropy, seed=2)
    whole = credit_multipliers(waad, fai, mask, **kwargs)
    monkeypatch.setattr(credit, "CPU_CHUNK_ELEMENTS", 80)   # two rows per chunk, the last chunk one row
    assert torch.equal(credit_multipliers(waad, fai, mask, **kwargs), whole)


# ---- the one gamma path (rhythm/credit/gamma.py): the strategy table, the random rule, the logged statistics --

def test_strategy_table_says_what_each_strategy_reads():
    from rhythm.config import STRATEGIES as NAMES
    from rhythm.credit.gamma import STRATEGY_TABLE
    from rhythm.integrations.config import ATTENTION_STRATEGIES, RhythmCreditConfig

    assert tuple(STRATEGY_TABLE) == NAMES
    assert ATTENTION_STRATEGIES == ("local", "global", "coupled")
    for name, info in STRATEGY_TABLE.items():
        assert RhythmCreditConfig(strategy=name).needs_scorer == info.attention
        for signal in ("waad", "fai", "entropy"):   # each required signal is refused when missing
            if getattr(info, signal):
                given = dict(waad=W, fai=F, entropy=torch.rand(2, 6))
                given[signal] = None
                with pytest.raises(ValueError, match=f"{signal}.* is required"):
                    credit_multipliers(given["waad"], given["fai"], M, strategy=name, entropy=given["entropy"])


def test_random_row_draw_is_independent_of_batch_padding_and_layout():
    """A row's random gamma depends only on the seed, its id and its sequence: alone, inside a batch with other
    rows, left-padded (sequence_start), or as a response-aligned tensor (negative sequence_start) - the same."""
    from rhythm.credit.gamma import compute_gamma

    prompt, response = 4, 9
    alone_mask = torch.zeros(1, prompt + response, dtype=torch.bool)
    alone_mask[0, prompt:] = True
    alone = compute_gamma("random", alone_mask, row_ids=["x"], seed=3)
    assert alone[0, prompt:].tolist() == random_baseline(3, "x", prompt, response)
    # in a batch, left-padded by 5 and right-padded by 2, between two other rows
    batch = torch.zeros(3, 5 + prompt + response + 2, dtype=torch.bool)
    batch[0, 2:10] = True
    batch[1, 5 + prompt:5 + prompt + response] = True
    batch[2, 0:3] = True
    padded = compute_gamma("random", batch, row_ids=["a", "x", "b"], sequence_start=torch.tensor([0, 5, 0]), seed=3)
    assert torch.equal(padded[1, 5 + prompt:5 + prompt + response], alone[0, prompt:])
    # response-aligned: the tensor starts `prompt` tokens into the sequence
    aligned = compute_gamma("random", torch.ones(1, response, dtype=torch.bool), row_ids=["x"],
                            sequence_start=[-prompt], seed=3)
    assert torch.equal(aligned[0], alone[0, prompt:])
    # another id or seed draws differently; int and str ids differ
    assert not torch.equal(compute_gamma("random", alone_mask, row_ids=["y"], seed=3), alone)
    assert not torch.equal(compute_gamma("random", alone_mask, row_ids=[5]),
                           compute_gamma("random", alone_mask, row_ids=["5"]))


def test_random_layout_arguments_are_checked():
    from rhythm.credit.gamma import compute_gamma

    with pytest.raises(ValueError, match="row_ids"):
        compute_gamma("random", M, row_ids=["only one"])
    with pytest.raises(ValueError, match="sequence_start"):
        compute_gamma("random", M, sequence_start=[0, 1.5])
    with pytest.raises(ValueError, match=r"sequence_start\[0\] = 5"):
        compute_gamma("random", M, sequence_start=[5, 0])   # after the row's first response token


def test_logged_statistics_by_hand():
    from rhythm.credit.gamma import gamma_metrics, gamma_sums

    gamma = torch.tensor([[1.0, 1.5, 1.5, 1.0], [2.0, 1.0, 1.0, 1.0]])
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    sums = gamma_sums(gamma, mask)
    assert sums.tolist() == [3.0, 7.0, 5.0]     # 1 + 1.5 + 1.5 + 2 + 1 over 5 tokens, 3 above 1
    assert gamma_metrics(sums) == {"rhythm/frac_amplified": 0.6, "rhythm/gamma_mean": 1.4}
    assert gamma_metrics(gamma_sums(gamma, torch.zeros_like(mask))) == {"rhythm/frac_amplified": 0.0,
                                                                       "rhythm/gamma_mean": 0.0}
