"""Layer 5, verl: the hooks that record the metrics inside the actor's forward (``hooks``, ``capture``,
``plugin``), the run script's checking launcher (``launch``) and the manual pieces (``credit``).
May import: ``rhythm.scoring`` and below, ``rhythm.integrations.config``.
"""
