"""The one integer rule (``rhythm_kernels.segments.is_integer``, and ``is_real`` beside it) at every entry point
that checks a Python value: numpy integers are accepted where ints are (and come back as plain ints), bools
never. One numpy case per entry point class: input rows, the probe's settings, the Ray options, the report's
group numbers, the capture's layer description."""
from __future__ import annotations

import numpy as np
import pytest

from rhythm_kernels.segments import is_integer, is_real


def test_the_rules_themselves():
    for x in (3, np.int64(3), np.uint8(3), np.int32(-1)):
        assert is_integer(x) and is_real(x)
    for x in (2.5, np.float32(2.5), np.float64("nan"), float("inf")):
        assert is_real(x) and not is_integer(x)
    for x in (True, np.bool_(False), "3", None, [3]):
        assert not is_integer(x) and not is_real(x)


def test_input_rows_take_numpy_ids_and_token_ids():
    """A row from a DataFrame carries numpy integers (pandas' int64 column, an object column of arrays)."""
    from rhythm.app.rows import RowError, parse_row

    row = parse_row({"id": np.int64(7), "prompt_ids": [np.int64(1), 2], "response_ids": [np.int32(3)]}, "row 1", 1)
    assert row.id == 7 and type(row.id) is int
    assert row.prompt_ids == [1, 2] and row.response_ids == [3]
    assert all(type(x) is int for x in row.prompt_ids + row.response_ids)
    for bad in ({"id": np.bool_(True)}, {"id": True}):
        with pytest.raises(RowError, match="'id' must be an int or a string"):
            parse_row({**bad, "prompt_ids": [1], "response_ids": [2]}, "row 1", 1)
    with pytest.raises(RowError, match=r"prompt_ids\[0\] must be a token id"):
        parse_row({"prompt_ids": [np.bool_(True)], "response_ids": [2]}, "row 1", 1)


def test_probe_settings_take_numpy_integers():
    from rhythm.app.probe.run import ProbeError, ProbeSettings

    settings = ProbeSettings(k=np.int64(3), batch_size=np.int32(20), seed=np.uint8(5))
    assert (settings.k, settings.batch_size, settings.seed) == (3, 20, 5)
    assert all(type(x) is int for x in (settings.k, settings.batch_size, settings.seed))
    assert settings.group_size == 2
    with pytest.raises(ProbeError, match="ProbeSettings.k must be an int >= 1"):
        ProbeSettings(k=np.bool_(True))
    with pytest.raises(ProbeError, match="ProbeSettings.seed must be an int"):
        ProbeSettings(seed=1.0)


def test_ray_options_take_numpy_numbers():
    from rhythm.app.distributed import RayOptions

    options = RayOptions(workers=np.int64(2), block_rows=np.uint16(8), cpus_per_worker=np.float32(0.5),
                         gpus_per_worker=np.int64(0))
    assert (options.workers, options.block_rows, options.cpus_per_worker, options.gpus_per_worker) == (2, 8, 0.5, 0)
    assert type(options.workers) is int and type(options.cpus_per_worker) is float
    with pytest.raises(ValueError, match="RayOptions.workers must be an int >= 1"):
        RayOptions(workers=True)
    with pytest.raises(ValueError, match="RayOptions.cpus_per_worker must be a finite number"):
        RayOptions(cpus_per_worker=np.float64("inf"))


def test_group_rewards_take_numpy_numbers():
    """The report's GRPO group reads each row's reward / advantage: numpy numbers count, bools do not."""
    from rhythm.app.rows import InputRow
    from rhythm.report.groups import _number

    def row(value):
        r = InputRow(1, 1, prompt="p", response="r")
        r.extra = {"reward": value}
        return r

    assert _number(row(np.int64(2)), "reward") == 2.0 and _number(row(np.float32(0.5)), "reward") == 0.5
    for bad in (True, np.bool_(True), np.float64("nan"), "1"):
        assert _number(row(bad), "reward") is None


def test_layer_description_takes_a_numpy_window():
    """A configuration whose sliding_window is a numpy integer describes the layer (transformers' own configs
    now refuse one on assignment; a config object another library built, or an older transformers, may not)."""
    pytest.importorskip("transformers")
    from rhythm.capture.architectures import UnsupportedModelError, describe_layer

    from .test_capture_models import tiny_model

    model = tiny_model("mistral")
    module = model.model.layers[1].self_attn
    window = describe_layer(module).sliding_window
    object.__setattr__(module.config, "sliding_window", np.int64(window))   # past the config's own type check
    described = describe_layer(module).sliding_window
    assert described == window and type(described) is int
    object.__setattr__(module.config, "sliding_window", np.bool_(True))
    with pytest.raises(UnsupportedModelError, match="is not a positive integer"):
        describe_layer(module)
