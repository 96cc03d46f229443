"""Token selection masks (docs/definitions.md section 4): top-q counts and ties, thresholds, dominated anchors,
intro tokens,
random and entropy baselines."""
import math

import pytest
import torch

from rhythm import entropy_selection, random_selection, rhythm_selection, top_q_mask
from rhythm.credit.selection import response_delta, selection_count


def _mask(length, start, end):
    m = torch.zeros(1, length, dtype=torch.bool)
    m[0, start:end] = True
    return m


def test_selection_count_float64():
    n = torch.tensor([0, 1, 2, 3, 7, 10, 50, 8191])
    for q in (0.4, 0.3, 0.1, 1.0, 0.25):
        assert selection_count(q, n).tolist() == [math.ceil(q * int(x)) for x in n]
    assert selection_count(0.3, torch.tensor([50])).item() == 15   # not 16 as float32 would give


def test_top_q_mask_ties_to_lower_position():
    scores = torch.tensor([[1., 3., 3., 2., 3., 0.]])
    eligible = torch.tensor([[True, True, True, True, True, False]])
    mask, threshold, count = top_q_mask(scores, eligible, 0.4)   # ceil(0.4 * 5) = 2
    assert count.item() == 2
    assert mask.tolist() == [[False, True, True, False, False, False]]   # the 3 at position 4 loses the tie
    assert threshold.item() == 3.0
    # Nothing eligible: nothing chosen, threshold +inf.
    mask, threshold, count = top_q_mask(scores, torch.zeros_like(eligible), 0.4)
    assert not mask.any() and threshold.item() == math.inf and count.item() == 0


def test_hand_worked_selection():
    # Positions 0..1 prompt, 2..9 response. WAAD on the response: 1 5 2 2 9 1 0 3.
    waad = torch.tensor([[0., 0., 1., 5., 2., 2., 9., 1., 0., 3.]])
    fai = torch.tensor([[0.9, 0.9, 0.5, 0.1, 0.1, 0.2, 0.1, 0.6, 0.7, 0.8]])
    mask = _mask(10, 2, 10)
    s = rhythm_selection(waad, fai, mask)
    # Delta at 2..8: |1-5| |5-2| |2-2| |2-9| |9-1| |1-0| |0-3| = 4 3 0 7 8 1 3; undefined at 9 (last).
    assert s.delta.tolist() == [[0., 0., 4., 3., 0., 7., 8., 1., 3., 0.]]
    assert s.delta_valid[0].tolist() == [False, False] + [True] * 7 + [False]
    # T_loc: ceil(0.4 * 7) = 3 largest Delta: 8 (pos 6), 7 (pos 5), 4 (pos 2); tau_delta = 4.
    assert s.preplan[0].nonzero().flatten().tolist() == [2, 5, 6] and s.tau_delta.item() == 4.0
    # T_glob: ceil(0.4 * 8) = 4 largest FAI on the response: 0.8 (9), 0.7 (8), 0.6 (7), 0.5 (2).
    assert s.anchor[0].nonzero().flatten().tolist() == [2, 7, 8, 9]
    # tau_waad: sorted response WAAD 0 1 1 2 2 3 5 9, lower median (index 3) = 2.
    assert s.tau_waad.item() == 2.0
    # Anchor 2: window [-1, 1] holds no response token -> not dominated.
    # Anchor 7: WAAD 1 <= 2; window 4..6 Delta 0 7 8, max 8 >= 4 -> dominated, intro = 6.
    # Anchor 8: WAAD 0 <= 2; window 5..7 Delta 7 8 1, max 8 >= 4 -> dominated, intro = 6.
    # Anchor 9: WAAD 3 > 2 -> not dominated.
    assert s.dominated[0].nonzero().flatten().tolist() == [7, 8]
    assert s.intro_of[0].tolist() == [-1] * 7 + [6, 6, -1]
    assert s.intro[0].nonzero().flatten().tolist() == [6]
    assert s.preplan_count.tolist() == [3] and s.anchor_count.tolist() == [4]


def test_intro_latest_position_on_ties_and_window_clipped_to_response():
    # Response 1..6. WAAD 0 2 0 2 0 0 -> Delta at 1..5: 2 2 2 2 0.
    waad = torch.tensor([[7., 0., 2., 0., 2., 0., 0.]])
    fai = torch.tensor([[0., 0., 0., 0., 0., 1., 0.]])
    s = rhythm_selection(waad, fai, _mask(7, 1, 7), q=0.2, k=3)
    # T_loc: ceil(0.2 * 5) = 1 -> position 1 (ties to the lower position); tau_delta = 2.
    assert s.preplan[0].nonzero().flatten().tolist() == [1]
    # T_glob: ceil(0.2 * 6) = 2: FAI 1 at 5, then the tie at 0 goes to position 1.
    assert s.anchor[0].nonzero().flatten().tolist() == [1, 5]
    # tau_waad: sorted 0 0 0 0 2 2 -> index 2 = 0. Anchor 5 (WAAD 0): window 2..4 Delta 2 2 2 -> intro = 4
    # (latest on ties). Anchor 1: window [-2, 0] within R = {} -> not dominated.
    assert s.dominated[0].nonzero().flatten().tolist() == [5]
    assert s.intro_of[0, 5].item() == 4
    # With k = 1 the window of 5 is {4}; with k = 10 it is clipped to 1..4 -> still 4.
    assert rhythm_selection(waad, fai, _mask(7, 1, 7), q=0.2, k=10).intro_of[0, 5].item() == 4


def test_tau_waad_is_torch_median():
    torch.manual_seed(0)
    waad = torch.rand(4, 12)
    mask = torch.zeros(4, 12, dtype=torch.bool)
    for b, (lo, hi) in enumerate([(0, 12), (3, 9), (5, 6), (2, 12)]):
        mask[b, lo:hi] = True
    s = rhythm_selection(waad, torch.rand(4, 12), mask)
    for b in range(4):
        assert s.tau_waad[b].item() == torch.median(waad[b][mask[b]]).item()


def test_no_anchor_when_every_fai_invalid():
    waad, fai = torch.rand(2, 9), torch.rand(2, 9)
    s = rhythm_selection(waad, fai, torch.ones(2, 9, dtype=torch.bool), torch.zeros(2, 9, dtype=torch.bool))
    assert not s.anchor.any() and not s.dominated.any() and not s.intro.any()
    assert s.preplan.sum().item() == 2 * math.ceil(0.4 * 8)


def test_empty_response_row_selects_nothing():
    s = rhythm_selection(torch.rand(1, 5), torch.rand(1, 5), torch.zeros(1, 5, dtype=torch.bool))
    for m in (s.preplan, s.anchor, s.dominated, s.intro, s.delta_valid):
        assert not m.any()
    assert s.tau_delta.item() == math.inf


def test_response_delta_undefined_on_last_token_at_sequence_end():
    d, valid = response_delta(torch.tensor([[1., 4., 2.]]), _mask(3, 1, 3))
    assert d.tolist() == [[0., 2., 0.]] and valid.tolist() == [[False, True, False]]


def test_random_selection_reproducible_and_sized():
    mask = torch.zeros(3, 40, dtype=torch.bool)
    mask[0, 5:], mask[1, :17], mask[2, 10:11] = True, True, True
    a = random_selection(mask, q=0.4, seed=7)
    assert torch.equal(a, random_selection(mask, q=0.4, seed=7))
    assert not torch.equal(a, random_selection(mask, q=0.4, seed=8))
    assert a.sum(1).tolist() == [math.ceil(0.4 * 35), math.ceil(0.4 * 17), 1]
    assert not (a & ~mask).any()


def test_entropy_selection():
    entropy = torch.tensor([[9., 1., 5., 5., 2., 0.]])
    # Response 1..5: ceil(0.4 * 5) = 2 -> entropy 5 at 2 and 3 (9 at position 0 is prompt).
    assert entropy_selection(entropy, _mask(6, 1, 6)).nonzero()[:, 1].tolist() == [2, 3]


def test_selection_bad_inputs():
    mask = torch.ones(1, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="contiguous"):
        rhythm_selection(torch.rand(1, 4), torch.rand(1, 4), torch.tensor([[True, False, True, True]]))
    with pytest.raises(ValueError, match="k must"):
        rhythm_selection(torch.rand(1, 4), torch.rand(1, 4), mask, k=0)
    with pytest.raises(ValueError, match="q must"):
        random_selection(mask, q=1.5)
    with pytest.raises(TypeError, match="seed"):
        random_selection(mask, seed=1.5)
    with pytest.raises(ValueError, match="entropy"):
        entropy_selection(torch.tensor([[0., float("nan"), 1., 1.]]), mask)


def test_kth_smallest_matches_sort():
    from rhythm.credit.selection import kth_smallest

    torch.manual_seed(9)
    values = torch.randint(0, 5, (6, 11)).float()
    eligible = torch.rand(6, 11) > 0.3
    eligible[0] = True
    n = eligible.sum(1)
    for b in range(6):
        ranked = sorted(values[b][eligible[b]].tolist())
        for r in range(int(n[b])):
            rank = torch.zeros(6, dtype=torch.long)
            rank[b] = r
            assert kth_smallest(values, eligible, rank)[b].item() == ranked[r]
