"""verl adapter, the separate-pass pieces: gamma from a verl batch, the
post-multiply after verl's real ``compute_advantage`` (grpo and a token-level estimator), the documented manual
recipe (gamma applied exactly once), and the hooks' installation (importing changes nothing; install() or the
plugin module through ``VERL_USE_EXTERNAL_MODULES``, in a fresh interpreter as a Ray worker would start).
The trainers' automatic path (the metrics recorded inside the actor's log-prob forward) is in
tests/test_verl_trainers.py.
"""
import math
import sys

import pytest

verl = pytest.importorskip("verl")
pytest.importorskip("tensordict")

import torch  # noqa: E402

from rhythm import RhythmScorer  # noqa: E402
from rhythm.integrations.config import RhythmCreditConfig  # noqa: E402
from rhythm.integrations.verl.credit import apply_rhythm_gamma, compute_rhythm_gamma  # noqa: E402

from .verl_standins import (P_MAX, R_MAX, RESPONSE_LENS, SMALL, algo_config, per_row_gamma,  # noqa: E402
                            plain_advantages, run_fresh, tiny_llama, verl_batch)


@pytest.fixture(scope="module")
def ray_trainer():
    try:
        from verl.trainer.ppo import ray_trainer as module
    except ImportError as exc:  # verl installed without the modules its trainer imports
        pytest.skip(f"verl.trainer.ppo.ray_trainer does not import: {exc}")
    return module


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.mark.parametrize("strategy", ["coupled", "local", "global"])
def test_gamma_aligned_to_responses(model, strategy):
    cfg = RhythmCreditConfig(strategy=strategy, **SMALL)
    data = verl_batch()
    scorer = RhythmScorer(model, **cfg.scorer_kwargs(4))
    reference = per_row_gamma(model, data, cfg)
    padded, metrics = compute_rhythm_gamma(scorer, data, cfg, return_metrics=True)
    assert padded.shape == data.batch["responses"].shape and padded.dtype == torch.float32
    torch.testing.assert_close(padded, reference, rtol=0, atol=0)
    mask = data.batch["response_mask"].bool()
    assert bool((padded[~mask] == 1).all())  # response padding (and the empty response) untouched
    assert bool((padded[mask] > 1).any())
    assert 0 < metrics["rhythm/frac_amplified"] < 1 and metrics["rhythm/gamma_mean"] > 1
    # gamma of response token i is that of its own position, not the one before (docs/definitions.md section 6)
    shifted = torch.ones_like(reference)
    shifted[:, 1:] = reference[:, :-1]
    assert not torch.equal(padded, shifted)


@pytest.mark.parametrize("estimator", ["grpo", "reinforce_plus_plus"])
def test_post_multiply_after_real_compute_advantage(model, ray_trainer, estimator):
    cfg = RhythmCreditConfig(strategy="coupled", **SMALL)
    data = verl_batch()
    gamma = compute_rhythm_gamma(RhythmScorer(model, **cfg.scorer_kwargs()), data, cfg)
    plain = ray_trainer.compute_advantage(verl_batch(), adv_estimator=estimator, config=algo_config(estimator))
    shaped = ray_trainer.compute_advantage(data, adv_estimator=estimator, config=algo_config(estimator))
    apply_rhythm_gamma(shaped, gamma)
    mask = data.batch["response_mask"].bool()
    base, adv = plain.batch["advantages"], shaped.batch["advantages"]
    assert bool((base[mask] != 0).any())
    torch.testing.assert_close(adv[mask], base[mask] * gamma[mask])
    torch.testing.assert_close(adv[~mask], base[~mask])  # off the response: untouched
    assert shaped.meta_info["metrics"]["rhythm/frac_amplified"] > 0


def test_sign_modes_and_random_entropy_baselines(ray_trainer):
    data = verl_batch()
    mask = data.batch["response_mask"].bool()
    plain = ray_trainer.compute_advantage(verl_batch(), adv_estimator="grpo", config=algo_config("grpo"))
    base = plain.batch["advantages"]
    assert bool((base > 0).any()) and bool((base < 0).any())
    gamma = compute_rhythm_gamma(None, data, RhythmCreditConfig(strategy="random"), seed=3)
    for b, r in enumerate(RESPONSE_LENS):
        assert int((gamma[b] > 1).sum()) == math.ceil(0.4 * r)
    assert not torch.equal(gamma, compute_rhythm_gamma(None, data, RhythmCreditConfig(strategy="random"), seed=4))
    for sign in ("positive", "negative"):
        shaped = ray_trainer.compute_advantage(verl_batch(), adv_estimator="grpo", config=algo_config("grpo"))
        apply_rhythm_gamma(shaped, gamma, sign=sign)
        adv = shaped.batch["advantages"]
        allowed = mask & ((base >= 0) if sign == "positive" else (base < 0))
        torch.testing.assert_close(adv[allowed], base[allowed] * gamma[allowed])
        torch.testing.assert_close(adv[~allowed], base[~allowed])
    # entropy baseline: verl's per-token entropys [B, R_len] from the log-prob pass
    entropys = torch.rand(mask.shape, generator=torch.Generator().manual_seed(1)) + 0.1
    data.batch["entropys"] = entropys * mask
    gamma = compute_rhythm_gamma(None, data, RhythmCreditConfig(strategy="entropy"))
    for b, r in enumerate(RESPONSE_LENS):
        chosen = gamma[b] > 1
        assert int(chosen.sum()) == math.ceil(0.4 * r)
        if 0 < int(chosen.sum()) < r:
            assert float(entropys[b][chosen].min()) >= float(entropys[b][mask[b] & ~chosen].max())
    with pytest.raises(ValueError, match="entropys"):
        compute_rhythm_gamma(None, verl_batch(), RhythmCreditConfig(strategy="entropy"))




# ---- installation: importing changes nothing; install() is the one switch -------------------------------------

def test_importing_the_hooks_changes_nothing_install_is_explicit():
    """A fresh interpreter: importing verl_hooks patches nothing and adds no import hook; install() patches
    the legacy trainer, the worker and compute_advantage; uninstall() restores verl's own functions."""
    code = ("import sys, verl\n"
            "before = list(sys.meta_path)\n"
            "from rhythm.integrations.verl import hooks as verl_hooks\n"
            "import verl.trainer.ppo.ray_trainer as rt\n"
            "from verl.workers.engine_workers import ActorRolloutRefWorker as W\n"
            "assert sys.meta_path == before and not verl_hooks.installed()\n"
            "plain = rt.compute_advantage\n"
            "assert not hasattr(plain, '__rhythm_wrapped__') and not hasattr(W.compute_log_prob, '__rhythm_wrapped__')\n"
            "assert not hasattr(rt.RayPPOTrainer._compute_old_log_prob, '__rhythm_wrapped__')\n"
            "verl_hooks.install(); verl_hooks.install()\n"
            "assert rt.compute_advantage.__rhythm_original__ is plain and W.compute_log_prob.__rhythm_wrapped__\n"
            "assert rt.RayPPOTrainer.__init__.__rhythm_wrapped__\n"
            "verl_hooks.uninstall()\n"
            "assert rt.compute_advantage is plain and not hasattr(W.compute_log_prob, '__rhythm_wrapped__')\n"
            "print('explicit')\n")
    assert "explicit" in run_fresh(code, "trainer")


def test_plugin_through_verl_env_var_installs_in_a_fresh_process(tmp_path):
    """VERL_USE_EXTERNAL_MODULES=rhythm.integrations.verl.plugin makes `import verl` install the hooks; modules
    imported later (the trainer, a `from ... import compute_advantage`, the workers) get the wrapped versions,
    with verl's register() dispatch attributes kept on the worker method (the worker group binds by them)."""
    (tmp_path / "late_user.py").write_text("from verl.trainer.ppo.ray_trainer import compute_advantage\n")
    code = ("import sys, verl\n"
            "from rhythm.integrations.verl import hooks as verl_hooks\n"
            "assert verl_hooks.installed()\n"
            "import verl.trainer.ppo.ray_trainer as rt, late_user\n"
            "assert rt.compute_advantage.__rhythm_wrapped__ and late_user.compute_advantage is rt.compute_advantage\n"
            "from verl.single_controller.base.decorator import MAGIC_ATTR\n"
            "from verl.workers.engine_workers import ActorRolloutRefWorker as W\n"
            "m = W.compute_log_prob\n"
            "assert m.__rhythm_wrapped__ and getattr(m, MAGIC_ATTR) == getattr(m.__rhythm_original__, MAGIC_ATTR)\n"
            "assert rt.RayPPOTrainer._compute_old_log_prob.__rhythm_wrapped__\n"
            "print('installed', getattr(m, MAGIC_ATTR)['dispatch_mode'])\n")
    out = run_fresh(code, "trainer", env={"VERL_USE_EXTERNAL_MODULES": "rhythm.integrations.verl.plugin"},
                    extra_path=tmp_path)
    assert "installed" in out


# ---- the documented manual recipe: gamma applied exactly once ----------------------------------------------------

def _manual_recipe(ray_trainer, data, gamma):
    """docs/integrations.md, verl, "Manual pieces", in its order (gamma given instead of scored, so the ratio is
    exact): verl's compute_advantage, then gamma, then apply_rhythm_gamma."""
    from rhythm.integrations.verl.credit import GAMMA_KEY, apply_rhythm_gamma

    data = ray_trainer.compute_advantage(data, adv_estimator="grpo", config=algo_config("grpo"))
    data.batch[GAMMA_KEY] = gamma
    apply_rhythm_gamma(data, sign="both")
    return data


@pytest.mark.parametrize("installed", [False, True])
def test_manual_recipe_multiplies_once(ray_trainer, installed):
    """The recipe imports the hooks module (for config_from_env), which changes nothing: the advantages are
    multiplied by gamma once - 1.5 stays 1.5 (it was 2.25 when importing patched compute_advantage) - also
    with the hooks installed; a second application is refused."""
    from rhythm.integrations.verl import hooks as verl_hooks
    from rhythm.integrations.verl.credit import apply_rhythm_gamma
    from rhythm.integrations.verl.hooks import config_from_env  # noqa: F401 - the recipe's import

    assert not verl_hooks.installed()  # (tests that install, uninstall when done)
    if installed:
        verl_hooks.install()
    try:
        gamma = torch.ones(len(RESPONSE_LENS), R_MAX)
        gamma[:, 0] = 1.5
        data = _manual_recipe(ray_trainer, verl_batch(), gamma)
        base = plain_advantages(ray_trainer)
        mask = data.batch["response_mask"].bool() & (base != 0)
        ratio = data.batch["advantages"][mask] / base[mask]
        assert sorted(set(ratio.round(decimals=4).tolist())) == [1.0, 1.5]
        torch.testing.assert_close(data.batch["advantages"], base * gamma)
        with pytest.raises(ValueError, match="already multiplied"):
            apply_rhythm_gamma(data, gamma)
    finally:
        verl_hooks.uninstall()


def test_installed_hooks_and_manual_apply_never_square_gamma(ray_trainer):
    """With the hooks installed and gamma in the batch before compute_advantage (the automatic path), verl's
    compute_advantage applies it; apply_rhythm_gamma afterwards fails loudly instead of squaring gamma, and
    recomputing the advantages (a fresh estimator pass clears the mark) gives gamma once again."""
    from rhythm.integrations.verl import hooks as verl_hooks
    from rhythm.integrations.verl.credit import apply_rhythm_gamma

    verl_hooks.install()
    try:
        gamma = torch.ones(len(RESPONSE_LENS), R_MAX)
        gamma[:, 0] = 1.5
        data = verl_batch()
        data.batch["rhythm_gamma"] = gamma
        for _ in range(2):
            data = ray_trainer.compute_advantage(data, adv_estimator="grpo", config=algo_config("grpo"))
            torch.testing.assert_close(data.batch["advantages"], plain_advantages(ray_trainer) * gamma)
        with pytest.raises(ValueError, match="already multiplied"):
            apply_rhythm_gamma(data, sign="both")
    finally:
        verl_hooks.uninstall()


def test_scorer_skips_rows_whose_advantages_are_zero(model, ray_trainer, monkeypatch):
    """Given the advantages, rows whose advantages are all 0 (a GRPO group with equal rewards) get gamma 1 and
    never reach the scorer; the other rows get the same gamma as without the skip."""
    cfg = RhythmCreditConfig(strategy="coupled", **SMALL)
    scorer = RhythmScorer(model, **cfg.scorer_kwargs())
    equal_rewards = (1.0, 1.0, 1.0, 2.0, 1.0, 0.0)  # group "a" all 1.0: its advantages are exactly 0
    data = ray_trainer.compute_advantage(verl_batch(scores=equal_rewards), adv_estimator="grpo",
                                         config=algo_config("grpo"))
    advantages = data.batch["advantages"]
    zero = ~(advantages != 0).any(-1)
    assert zero.tolist() == [True, True, True, False, True, False]  # row 4 has an empty response
    seen = []
    real_score = scorer.score
    monkeypatch.setattr(scorer, "score", lambda ids, *a, **k: seen.append(ids.shape) or real_score(ids, *a, **k))
    gamma, metrics = compute_rhythm_gamma(scorer, data, cfg, advantages=advantages, return_metrics=True)
    assert metrics["rhythm/rows_skipped"] == 4
    assert bool((gamma[zero] == 1).all())
    full = per_row_gamma(model, verl_batch(), cfg)
    torch.testing.assert_close(gamma[~zero], full[~zero], rtol=0, atol=0)
    assert sum(shape[0] for shape in seen) == 2  # only the live rows


def test_run_script_composes_a_config_the_hooks_accept(tmp_path):
    """examples/verl_rhythm_grpo.sh as documented: `--cfg job` anywhere (here first), and the documented
    override `+rhythm.strategy=random` replacing the script's default (Hydra alone fails with "an item is
    already at rhythm.strategy"); verl's Hydra prints the composed run config and exits, and the hooks accept
    its rhythm block and run mode."""
    import os
    import subprocess

    import yaml
    from omegaconf import OmegaConf

    from rhythm.integrations.verl import hooks as verl_hooks

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(["bash", os.path.join(root, "examples", "verl_rhythm_grpo.sh"), "--cfg", "job",
                             "+rhythm.strategy=random", "rhythm.q=0.3"],
                            env=dict(os.environ, PYTHON=sys.executable), cwd=tmp_path, capture_output=True,
                            text=True, timeout=600)
    if result.returncode != 0 and "No module named" in result.stderr:
        pytest.skip(f"verl's main_ppo does not import here: {result.stderr.strip().splitlines()[-1]}")
    assert result.returncode == 0, result.stderr[-2000:]
    config = OmegaConf.create(yaml.safe_load(result.stdout))
    rhythm = verl_hooks.resolve_config(config)
    verl_hooks.check_run_mode(config, rhythm)
    assert (rhythm.strategy, rhythm.q, rhythm.sign, rhythm.horizon) == ("random", 0.3, "both", (10, 100))
    assert config.actor_rollout_ref.model.external_lib == "rhythm.integrations.verl.plugin"


@pytest.mark.parametrize("overrides, words", [
    (["+rhythm.qq=0.3"], "did you mean 'q'"),
    (["rhythm.strategy=anchors"], "strategy must be one of"),
    (["++rhythm.horizon=[100,10]"], "horizon must be"),
    (["+rhythm.credit_pass=scorer"], "fused pass only"),
    (["actor_rollout_ref.actor.strategy=megatron"], "FSDP/FSDP2"),
    (["no_such_group.key=1"], "does not compose"),
])
def test_launcher_checks_the_rhythm_block_at_compose_time(capsys, monkeypatch, overrides, words):
    """The run script's launcher composes verl's config with the overrides and checks the rhythm block and
    the run mode before verl starts (with --cfg job too): one line, exit 2, nothing launched."""
    pytest.importorskip("hydra")
    import os

    from rhythm.integrations.verl import launch

    monkeypatch.setattr(os, "execv", lambda *a: pytest.fail(f"launched {a}"))
    assert launch.main(["+rhythm.strategy=coupled", *overrides, "--cfg", "job"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("rhythm: error:") and words in err, err


def test_launcher_normalises_overrides_and_moves_hydra_flags():
    from rhythm.integrations.verl.launch import LaunchError, split_arguments

    overrides, flags = split_arguments(["--cfg", "job", "+rhythm.strategy=coupled", "data.x=1", "+rhythm.q=0.4",
                                        "++rhythm.strategy=random", "rhythm.q=0.3", "--resolve", "-p=pkg"])
    assert overrides == ["+rhythm.strategy=random", "data.x=1", "+rhythm.q=0.3"]
    assert flags == ["--cfg", "job", "--resolve", "-p=pkg"]
    with pytest.raises(LaunchError, match="--config-name"):
        split_arguments(["--config-name", "other"])
    with pytest.raises(LaunchError, match="needs a value"):
        split_arguments(["x=1", "--cfg"])
