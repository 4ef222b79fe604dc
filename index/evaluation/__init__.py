"""Evaluation apart from the query path: evaluation sets, the evaluator, the chroma + DTW
baseline, repeat detection and ``midimatch eval``. Nothing in ``index/``'s query path,
``worker/`` or the gateway imports it."""
