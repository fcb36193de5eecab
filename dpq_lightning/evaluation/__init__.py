"""Evaluation: how samples are drawn and scored.

* :mod:`.protocol` - :class:`SamplingProtocol`, the typed record of what a set of samples depends on;
* :mod:`.config` - ``EvalConfig`` (a run's ``eval`` section) and ``OfflineEvalConfig`` (``scripts/evaluate.py``);
* :mod:`.offline` - ``sample_n`` (a protocol's samples, sharded by rank) and ``evaluate_model``;
* :mod:`.final` - the evaluation of a finished model written into a run's ``summary.json``;
* :mod:`.trajectory` - per-block error of a student along a sampling trajectory (the paper's Figure 2).
"""
