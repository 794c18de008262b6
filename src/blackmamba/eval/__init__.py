"""Evaluation: perplexity / bits per byte on text files, and the lm-evaluation-harness adapter.

``blackmamba eval MODEL --text FILE`` and ``blackmamba eval MODEL --tasks ...`` (see ``command``).
"""
