"""The eviction-quality suite: how much of what the model can do survives a bounded cache.

Three tasks (``retrieval``, ``reasoning``, ``text``) run every method at budgets given as fractions of each
case's context, always beside ``full``, ``streaming`` and ``random``; every method's difference to the
references is reported with a paired bootstrap 95% interval over cases. Texts and problems are generated or
read from the Python standard library: nothing is downloaded. Entry points: ``epikv-triton quality`` and
:func:`epikv_triton.quality.suite.run_suite`.
"""
