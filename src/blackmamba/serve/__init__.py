"""Serving: ``Engine`` (continuous batching over ``model.step``, a prefix-state cache; usable without HTTP),
``create_app`` (the OpenAI-compatible HTTP API over an engine) and ``blackmamba serve`` (docs/serving.md)."""

from .engine import Delta, Engine, EngineClosed, Overloaded, Request, SamplingParams, TokenLogprob
from .prefix_cache import PrefixCache

__all__ = ["Delta", "Engine", "EngineClosed", "Overloaded", "PrefixCache", "Request", "SamplingParams",
           "TokenLogprob"]
