"""Helpers of the test suite (models, corpora, the Triton interpreter, OS limits, the release's reference code)."""
