"""Evaluation: one entry point (``evaluate.evaluate``) over the mixture's evaluation sets.

``generate`` does batched greedy generation cut at stop strings, ``normalize`` is the one home of
answer matching (lm-eval's ``triviaqa`` / ``nq_open`` rules), ``metrics`` scores examples in batches
(teacher-forced EM, generated EM, response loss), ``harness`` runs lm-evaluation-harness tasks on the
in-memory model (optional ``.[eval]`` extra, imported only when asked for).
"""
