"""``rhythm probe``: the paper's own tests of the preplan-and-anchor rhythm, run on the user's model
(docs/probe.md): the FAI-perturbation test, the coupling of anchors with WAAD peaks and preplan tokens, WAAD
against entropy, and the local/global head split with its attention-sink share.

Modules: ``prompts`` (built-in set, user files), ``generate`` (batched greedy), ``text`` (content-word
Jaccard), ``trials`` (one prompt's measurements), ``stats`` (paired tests, intervals, permutation tail),
``summary``, ``page`` (HTML), ``run`` (:func:`run_probe`, the journal), ``command`` (the CLI).
"""
from rhythm.app.probe.prompts import BUILTIN, Prompt, PromptError, load_prompts
from rhythm.app.probe.run import ProbeError, ProbeSettings, run_probe

__all__ = ["BUILTIN", "Prompt", "PromptError", "ProbeError", "ProbeSettings", "load_prompts", "run_probe"]
