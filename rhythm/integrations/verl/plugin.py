"""What verl imports to get rhythm credit: importing this module calls
:func:`rhythm.integrations.verl.hooks.install` (and nothing else).

    VERL_USE_EXTERNAL_MODULES=rhythm.integrations.verl.plugin            # driver and every Ray worker
    actor_rollout_ref.model.external_lib=rhythm.integrations.verl.plugin  # every worker building the model

See ``rhythm.integrations.verl.hooks`` for what is patched and docs/integrations.md ("verl") for the
configuration.
"""
from rhythm.integrations.verl.hooks import install

install()
