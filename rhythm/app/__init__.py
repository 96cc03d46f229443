"""Layer 5, the application: the ``rhythm`` command line, the input rows and the output of ``rhythm score``.

May import anything in ``rhythm`` except ``rhythm.integrations``.
"""
