"""Layer sampling, head groups and per-token signals (docs/definitions.md section 3)."""
import math

import pytest
import torch

from rhythm import (HeadGroups, fixed_head_groups, head_to_layer, mean_response_distance, sample_layers,
                    select_head_groups, token_signals)
from rhythm.credit.heads import group_size


@pytest.mark.parametrize("num_layers, expected", [
    (36, [12, 15, 18, 21, 24]),   # docs/definitions.md section 3's example
    (30, [10, 12, 15, 17, 20]),   # docs/definitions.md section 3's example
    (24, [8, 10, 12, 14, 16]),    # lo 8, hi 16, step 2
    (3, [1, 2]),                  # lo 1, hi 2: 1 + (i * 1) // 4 = 1, 1, 1, 1, 2 -> deduplicated
])
def test_sample_layers(num_layers, expected):
    assert sample_layers(num_layers) == expected


def test_sample_layers_every_layer_rule_unchanged():
    """With every layer a softmax-attention layer (explicitly or None) the rule is lo + (i (hi - lo)) // 4."""
    for n in range(3, 130):
        lo, hi = n // 3, 2 * n // 3
        old = sorted({lo + (i * (hi - lo)) // 4 for i in range(5)})
        assert sample_layers(n) == old == sample_layers(n, range(n)), n


@pytest.mark.parametrize("num_layers, attention, expected", [
    (48, range(3, 48, 4), [19, 23, 27, 31]),   # Qwen3-Next-80B: 4 attention layers in [16, 32], all taken
    (32, range(3, 32, 4), [11, 15, 19]),       # Qwen3.5-9B-like: [10, 21] holds 11, 15, 19
    (60, range(1, 60, 2), [21, 25, 29, 33, 39]),  # 10 candidates 21..39 in [20, 40]: c_0, c_2, c_4, c_6, c_9
    (6, [1, 3, 5], [3]),                        # the tiny hybrid of the tests
])
def test_sample_layers_hybrid(num_layers, attention, expected):
    """docs/definitions.md section 3: layer_i = c_((i (n - 1)) // 4) over the n attention layers in [lo, hi]."""
    assert sample_layers(num_layers, attention) == expected


def test_sample_layers_hybrid_without_middle_attention_layer():
    with pytest.raises(ValueError, match=r"no softmax-attention layer lies in the middle third \[2, 4\]"):
        sample_layers(6, [0, 5])
    with pytest.raises(ValueError, match="attention_layers must lie in"):
        sample_layers(6, [1, 6])


@pytest.mark.parametrize("bad", [2, 0, -5, 3.0, True, "36"])
def test_sample_layers_rejects(bad):
    with pytest.raises(ValueError, match="num_layers"):
        sample_layers(bad)


def test_group_size_float64_ceil():
    # docs/definitions.md section 3: ceil(0.3 * 50) = 15 in float64 (0.3 * 50 == 15.0 exactly); float32 gives 16.
    assert group_size(50, 0.3) == 15 == math.ceil(0.3 * 50)
    assert math.ceil((torch.tensor(0.3, dtype=torch.float32) * 50).item()) == 16
    groups = select_head_groups(torch.arange(50, dtype=torch.float32)[None])
    assert groups.local.shape == (1, 15) and groups.global_.shape == (1, 15)
    assert group_size(10, 0.3) == 3 and group_size(9, 0.3) == 3 and group_size(1, 0.3) == 1


def test_mean_response_distance_hand_example():
    # Row 0: left padding at 0, prompt at 1, response at 2..3. Row 1: empty response -> d = 0.
    distance = torch.tensor([[[0., 1., 2., 4.], [0., 0., 6., 8.]],
                             [[1., 2., 3., 4.], [5., 6., 7., 8.]]])
    mask = torch.tensor([[False, False, True, True], [False, False, False, False]])
    d = mean_response_distance(distance, mask)
    assert d.dtype == torch.float32
    assert torch.equal(d, torch.tensor([[3., 7.], [0., 0.]]))   # (2 + 4) / 2, (6 + 8) / 2


def test_mean_response_distance_ignores_nan_off_response():
    distance = torch.tensor([[[float("nan"), 1., 3.]]])
    assert torch.equal(mean_response_distance(distance, torch.tensor([[False, True, True]])), torch.tensor([[2.]]))


def test_select_head_groups_tie_breaks():
    # n = 10 -> ceil(0.3 * 10) = 3 per group. Ties on d go to the lower flat index = (layer, head) order.
    d = torch.tensor([[2., 1., 1., 5., 0., 5., 1., 5., 3., 4.]])
    groups = select_head_groups(d)
    assert groups.local.tolist() == [[4, 1, 2]]      # d 0 (head 4), then d 1 at heads 1, 2 (6 is left out)
    assert groups.global_.tolist() == [[3, 5, 7]]    # d 5 at heads 3, 5, 7 in index order
    assert groups.local.dtype == torch.long


def test_select_head_groups_all_equal_and_per_row():
    d = torch.tensor([[1., 1., 1., 1.], [4., 3., 2., 1.]])
    groups = select_head_groups(d, fraction=0.5)
    assert groups.local.tolist() == [[0, 1], [3, 2]]
    assert groups.global_.tolist() == [[0, 1], [0, 1]]


def test_head_to_layer():
    layers = [12, 15, 18, 21, 24]
    assert head_to_layer(0, 32) == (0, 0)
    assert head_to_layer(70, 32) == (2, 6)
    assert head_to_layer(70, 32, layers) == (18, 6)
    layer, head = head_to_layer(torch.tensor([[0, 33, 159]]), 32, layers)
    assert layer.tolist() == [[12, 15, 24]] and head.tolist() == [[0, 1, 31]]
    groups = HeadGroups(torch.tensor([[1]]), torch.tensor([[40]]))
    (ll, lh), (gl, gh) = groups.layer_head(32, layers)
    assert (ll.item(), lh.item(), gl.item(), gh.item()) == (12, 1, 15, 8)
    with pytest.raises(ValueError, match="heads_per_layer"):
        head_to_layer(3, 0)


def test_token_signals_hand_example():
    # 4 heads, T = 2. H_loc = heads {0, 2}, H_glob = heads {3}.
    waad = torch.tensor([[[1., 2.], [10., 10.], [3., 6.], [0., 0.]]])
    fai = torch.tensor([[[0., 0.], [0.5, 0.5], [0., 0.], [0.2, 0.4]]])
    w, f = token_signals(waad, fai, HeadGroups(torch.tensor([[0, 2]]), torch.tensor([[3]])))
    assert torch.equal(w, torch.tensor([[2., 4.]])) and torch.allclose(f, torch.tensor([[0.2, 0.4]]))
    assert w.dtype == torch.float32 and f.dtype == torch.float32


def test_fixed_head_groups_broadcast():
    torch.manual_seed(0)
    d = torch.rand(3, 10)
    has_response = torch.tensor([True, False, True])
    fixed = fixed_head_groups(d, has_response)
    assert fixed.batch_size == 1
    expected = select_head_groups(d[[0, 2]].double().mean(0, keepdim=True))
    assert torch.equal(fixed.local, expected.local) and torch.equal(fixed.global_, expected.global_)
    waad, fai = torch.rand(3, 10, 7), torch.rand(3, 10, 7)
    w1, f1 = token_signals(waad, fai, fixed)
    w2, f2 = token_signals(waad, fai, fixed.broadcast(3))
    assert torch.equal(w1, w2) and torch.equal(f1, f2)
    assert fixed.broadcast(3).local.shape == (3, 3)
    with pytest.raises(ValueError, match="batch"):
        select_head_groups(d).broadcast(5)
    with pytest.raises(ValueError, match="has_response"):
        fixed_head_groups(d, torch.zeros(3, dtype=torch.bool))


def test_pipeline_per_row_groups_match_loop():
    torch.manual_seed(1)
    batch, heads, length = 3, 12, 9
    distance, waad, fai = torch.rand(batch, heads, length) * 5, torch.rand(batch, heads, length), torch.rand(batch, heads, length)
    mask = torch.zeros(batch, length, dtype=torch.bool)
    mask[0, 3:], mask[1, 5:8], mask[2, 1:] = True, True, True
    groups = select_head_groups(mean_response_distance(distance, mask))
    w, f = token_signals(waad, fai, groups)
    for b in range(batch):
        rows = [t for t in range(length) if mask[b, t]]
        d = [sum(distance[b, h, t].item() for t in rows) / len(rows) for h in range(heads)]
        n = math.ceil(0.3 * heads)
        loc = sorted(range(heads), key=lambda h: (d[h], h))[:n]
        glo = sorted(range(heads), key=lambda h: (-d[h], h))[:n]
        assert groups.local[b].tolist() == loc and groups.global_[b].tolist() == glo
        assert torch.allclose(w[b], waad[b, loc].mean(0)) and torch.allclose(f[b], fai[b, glo].mean(0))


def test_bad_inputs():
    mask = torch.ones(1, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="distance"):
        mean_response_distance(torch.rand(2, 4), mask)
    with pytest.raises(TypeError, match="response_mask"):
        mean_response_distance(torch.rand(1, 2, 4), mask.long())
    with pytest.raises(ValueError, match="response_mask"):
        mean_response_distance(torch.rand(1, 2, 4), torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="fraction"):
        select_head_groups(torch.rand(1, 4), fraction=0.0)
    with pytest.raises(ValueError, match="fraction"):
        select_head_groups(torch.rand(1, 4), fraction=1.5)
    with pytest.raises(ValueError, match="d must"):
        select_head_groups(torch.arange(4)[None])
    groups = select_head_groups(torch.rand(1, 4))
    with pytest.raises(ValueError, match="waad and fai"):
        token_signals(torch.rand(1, 4, 3), torch.rand(1, 4, 2), groups)
    with pytest.raises(ValueError, match="fai"):
        token_signals(torch.rand(1, 4, 3), torch.rand(4, 3), groups)
