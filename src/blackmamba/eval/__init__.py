"""Evaluation: perplexity / bits per byte of text (``perplexity``, reading files in pieces: ``textstream``), and
lm-evaluation-harness tasks (``tasks``, through the adapter ``lm_eval_adapter``); the command is ``cli/eval.py``.
"""
