"""Check a verl run's configuration the way verl composes it, then start verl's trainer.

    python -m rhythm.integrations.verl.launch [OVERRIDE ...] [HYDRA FLAG ...]

What ``examples/verl_rhythm_grpo.sh`` runs (its own overrides first, the user's after them):

- the ``rhythm`` block's overrides may be written ``rhythm.k=v``, ``+rhythm.k=v`` or ``++rhythm.k=v``; for
  each key the last one wins (so a user's ``+rhythm.strategy=random`` replaces the script's default instead
  of failing in Hydra with "an item is already at rhythm.strategy"); they reach Hydra as one ``+rhythm.k=v``
  per key (verl's own config has no ``rhythm`` block);
- Hydra's flags (``--cfg job``, ``--package``, ``--resolve``, ``--info``) go last, wherever they were written;
- verl's config (``verl/trainer/config/ppo_trainer.yaml``) is composed with the overrides through Hydra's
  compose API and the ``rhythm`` block and the run mode are checked with the hooks' own rules
  (:func:`rhythm.integrations.verl.hooks.resolve_config`, :func:`~rhythm.integrations.verl.hooks.check_run_mode`):
  a bad key or value, or a mode that could not record gamma, is one line on stderr and exit code 2 - also
  with ``--cfg job``, which on its own only prints the config;
- then this process becomes ``python -m verl.trainer.main_ppo`` with the normalised arguments.
"""
from __future__ import annotations

import os
import sys

# Hydra's flags: those followed by a value, and those that stand alone.
_VALUE_FLAGS = {"--cfg", "-c", "--package", "-p"}
_ALONE_FLAGS = {"--resolve", "--info", "-i", "--help", "-h", "--hydra-help", "--version"}
_UNSUPPORTED = {"--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd", "--multirun", "-m",
                "--run", "-r", "--shell-completion", "-sc", "--experimental-rerun"}


class LaunchError(ValueError):
    """A command line or configuration the launcher refuses: one line on stderr, exit code 2."""


def split_arguments(argv: list[str]) -> tuple[list[str], list[str]]:
    """(overrides, hydra_flags): the rhythm block's overrides normalised (one ``+rhythm.k=v`` per key, the last
    one given wins, in the order of each key's first appearance), the others as given; Hydra's flags apart."""
    overrides: list[str] = []
    rhythm: dict[str, str] = {}
    flags: list[str] = []
    items = iter(argv)
    for item in items:
        name = item.split("=", 1)[0]
        if name in _UNSUPPORTED:
            raise LaunchError(f"{name} is not supported by the launcher (it composes verl's ppo_trainer config); "
                              "run python -m verl.trainer.main_ppo directly for it")
        if name in _VALUE_FLAGS:
            flags.append(item)
            if "=" not in item:
                value = next(items, None)
                if value is None:
                    raise LaunchError(f"{item} needs a value (e.g. --cfg job)")
                flags.append(value)
            continue
        if name in _ALONE_FLAGS or item.startswith("-"):
            flags.append(item)
            continue
        key, sep, value = item.partition("=")
        bare = key.lstrip("+")
        if bare.startswith("rhythm.") and sep:
            if bare not in rhythm:
                overrides.append(bare)        # a placeholder: the key's slot
            rhythm[bare] = value
            continue
        overrides.append(item)
    return [f"+{item}={rhythm[item]}" if item in rhythm else item for item in overrides], flags


def compose(overrides: list[str]):
    """verl's run config (``ppo_trainer``) composed with ``overrides`` by Hydra, as ``main_ppo`` would."""
    import importlib.util

    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException

    spec = importlib.util.find_spec("verl")
    if spec is None or not spec.submodule_search_locations:
        raise LaunchError("verl is not installed here (pip install --no-deps verl==0.9.1; docs/integrations.md)")
    config_dir = os.path.join(list(spec.submodule_search_locations)[0], "trainer", "config")
    try:
        with initialize_config_dir(config_dir=config_dir, version_base=None):
            return hydra_compose(config_name="ppo_trainer", overrides=overrides)
    except HydraException as exc:
        raise LaunchError(f"verl's config does not compose with these overrides: {exc}") from None


def check(argv: list[str]) -> list[str]:
    """The checked, normalised arguments for ``verl.trainer.main_ppo`` (LaunchError when refused)."""
    from rhythm.integrations.verl import hooks

    overrides, flags = split_arguments(argv)
    if any(flag in ("--help", "-h", "--hydra-help", "--version") for flag in flags):
        return overrides + flags          # nothing is run: verl prints its help
    config = compose(overrides)
    try:
        hooks.check_run_mode(config, hooks.resolve_config(config))
    except ValueError as exc:
        raise LaunchError(str(exc)) from None
    return overrides + flags


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        arguments = check(argv)
    except LaunchError as exc:
        text = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())   # one line
        print(f"rhythm: error: {text}", file=sys.stderr)
        return 2
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, "-m", "verl.trainer.main_ppo", *arguments])
    return 0   # not reached


if __name__ == "__main__":
    sys.exit(main())
