"""What verl imports to get rhythm credit: importing this module calls
:func:`rhythm.integrations.verl_hooks.install` (and nothing else).

    VERL_USE_EXTERNAL_MODULES=rhythm.integrations.verl_plugin            # driver and every Ray worker
    actor_rollout_ref.model.external_lib=rhythm.integrations.verl_plugin  # every worker building the model

See ``rhythm.integrations.verl_hooks`` for what is patched and docs/integrations.md ("verl") for the
configuration.
"""
from .verl_hooks import install

install()
