"""RhythmGRPOConfig: GRPOConfig + rhythm_* fields, read by TRL's own parser from the command line and YAML."""
import os
import pickle

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
trl = pytest.importorskip("trl")

from trl import TrlParser  # noqa: E402

from rhythm.config import KNOBS, ConfigError  # noqa: E402
from rhythm.integrations.trl import RhythmCreditConfig, RhythmGRPOConfig  # noqa: E402

CPU = ["--output_dir", "/tmp/rhythm-trl-config", "--use_cpu", "true", "--bf16", "false", "--report_to", "none"]


def parse(argv):
    (config,) = TrlParser((RhythmGRPOConfig,)).parse_args_and_config(argv)
    return config


def test_command_line_with_trl_flags_of_the_same_name():
    config = parse(CPU + ["--seed", "3", "--rhythm_seed", "11", "--rhythm_q", "0.3", "--rhythm_strategy", "local",
                          "--rhythm_horizon", "5", "end", "--rhythm_layers", "2", "1", "--rhythm_credit_pass", "scorer",
                          "--rhythm_apply_in_eval", "true", "--num_generations", "4"])
    assert config.seed == 3 and config.num_generations == 4      # TRL's own flags untouched
    credit = config.rhythm_credit_config()
    assert credit == RhythmCreditConfig(seed=11, q=0.3, strategy="local", horizon=(5, None), layers=(1, 2))
    assert config.rhythm_credit_pass == "scorer" and config.rhythm_apply_in_eval is True


def test_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("output_dir: /tmp/rhythm-trl-config\nuse_cpu: true\nbf16: false\nreport_to: none\nseed: 4\n"
                    "rhythm_q: 0.25\nrhythm_horizon: [3, null]\nrhythm_gamma_amp: 2.0\nrhythm_sign: positive\n")
    config = parse(["--config", str(path)])
    assert config.seed == 4
    assert config.rhythm_credit_config() == RhythmCreditConfig(q=0.25, horizon=(3, None), gamma_amp=2.0,
                                                                 sign="positive")


def test_defaults_and_help_come_from_the_one_definition():
    config = parse(CPU)
    assert config.rhythm_credit_config() == RhythmCreditConfig()
    assert config.rhythm_credit_pass == KNOBS["credit_pass"].default == "fused"
    help_text = TrlParser((RhythmGRPOConfig,)).format_help()
    assert KNOBS["gamma_amp"].help.split()[0] in help_text and "--rhythm_gamma_amp" in help_text


@pytest.mark.parametrize("argv, field", [(["--rhythm_q", "1.5"], "rhythm_q"),
                                         (["--rhythm_horizon", "10", "soon"], "rhythm_horizon"),
                                         (["--rhythm_credit_pass", "extra"], "rhythm_credit_pass"),
                                         (["--rhythm_k", "0"], "rhythm_k")])
def test_bad_values_fail_naming_the_field(argv, field):
    with pytest.raises(ConfigError, match=field):
        parse(CPU + argv)


def test_pickles_like_the_trainer_saves_it():
    config = parse(CPU + ["--rhythm_q", "0.3"])
    again = pickle.loads(pickle.dumps(config))
    assert type(again) is RhythmGRPOConfig and again.rhythm_credit_config() == config.rhythm_credit_config()
