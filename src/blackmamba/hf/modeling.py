"""``BlackMambaForCausalLM``: the core ``BlackMambaLM`` behind transformers' ``PreTrainedModel`` API.

A thin adapter, not a second implementation: the model's top-level modules *are* the core model's
``embedding`` and ``decoder`` (the same objects), so the state dict — and the safetensors file that
``save_pretrained`` writes — holds exactly the native / release keys (``embedding.word_embeddings.weight``,
``decoder.layers.{i}.mixer.in_proj.weight``, ...), and ``forward`` runs the core model (``model.lm``).

- ``generate()`` works with transformers' own ``DynamicCache`` (see ``blackmamba.hf.cache``): greedy,
  sampling, beam search, streamers, stopping criteria. transformers passes the cache as ``cache_params``
  (its name for Mamba-style models).
- Logits are cut to ``config.vocab_size``: the padded embedding rows are never tokens.
- ``from_pretrained`` loads transformers / native folders (they are the same format) and, through
  ``blackmamba.load_pretrained``, release-format folders and hub ids (``Zyphra/BlackMamba-1.5B``).
- Loading is strict: a checkpoint with missing, unexpected or misshaped tensors raises ``CheckpointError``.

``save_pretrained`` copies this file and its relative imports (configuration.py, cache.py) next to the weights
for ``trust_remote_code``; the core package is imported by absolute name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.utils import ModelOutput

from blackmamba.checkpoint import CheckpointError, load_pretrained
from blackmamba.model import BlackMambaLM

from .cache import bind_state, commit
from .configuration import BlackMambaConfig

# keyword arguments that transformers' loss function takes from the Trainer
_LOSS_KWARGS = ("num_items_in_batch",)


@dataclass
class BlackMambaCausalLMOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # (b, l, vocab_size)
    cache_params: Cache | None = None


class BlackMambaPreTrainedModel(PreTrainedModel):
    config_class = BlackMambaConfig
    config: BlackMambaConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]
    _is_stateful = True  # a recurrent state cannot be rolled back: no assisted generation
    # the SSM parameters stay fp32 in bf16 / fp16 models, as in blackmamba.load_pretrained
    _keep_in_fp32_modules_strict = ["A_log", "mixer.D"]

    def _init_weights(self, module):
        # The core model initialises itself when constructed; loading is strict, so no weight is ever left
        # for transformers to fill in.
        pass


class BlackMambaForCausalLM(BlackMambaPreTrainedModel, GenerationMixin):
    # as register_for_auto_class("AutoModelForCausalLM") would: save_pretrained writes auto_map and copies the
    # code, so a saved folder loads with trust_remote_code=True wherever blackmamba is installed
    _auto_class = "AutoModelForCausalLM"

    def __init__(self, config: BlackMambaConfig):
        super().__init__(config)
        self._adopt(BlackMambaLM(config.to_core()))
        self.post_init()

    def _adopt(self, lm: BlackMambaLM) -> None:
        # register the core model's modules as our own (same objects): parameters appear once, under the
        # native names; ``lm`` itself is a plain attribute, not a submodule
        self.embedding = lm.embedding
        self.decoder = lm.decoder
        self.output_layer = lm.output_layer  # None when the head is tied to the embedding
        object.__setattr__(self, "lm", lm)

    @classmethod
    def from_core(cls, lm: BlackMambaLM) -> "BlackMambaForCausalLM":
        """Wrap a core model; the weights are shared, not copied."""
        with torch.device("meta"):
            model = cls(BlackMambaConfig.from_core(lm.config))
        model._adopt(lm)
        model.train(lm.training)
        return model

    # ------------------------------------------------------------------ embeddings
    def get_input_embeddings(self):
        return self.embedding.word_embeddings

    def set_input_embeddings(self, value):
        self.embedding.word_embeddings = value

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """A transformers / native folder or hub id, or a release-format one (``Zyphra/BlackMamba-1.5B``)."""
        if _is_release(pretrained_model_name_or_path, kwargs.get("revision")):
            unsupported = sorted(set(kwargs) - {"dtype", "revision"})
            if model_args or unsupported:
                raise ValueError(f"release-format checkpoints take only dtype= and revision=, not "
                                 f"{', '.join(unsupported) or 'positional arguments'}; convert the checkpoint "
                                 f"first: blackmamba convert SRC DST --to hf")
            lm = load_pretrained(pretrained_model_name_or_path, dtype=kwargs.get("dtype", "auto"),
                                 revision=kwargs.get("revision"))
            return cls.from_core(lm)
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *model_args,
                                              output_loading_info=True, **kwargs)
        problems = [f"  {what} tensor {key}" for what, keys in (("missing", info["missing_keys"]),
                                                                ("unexpected", info["unexpected_keys"]))
                    for key in sorted(keys)]
        problems += [f"  wrong shape for {m[0] if isinstance(m, tuple) else m}" for m in info["mismatched_keys"]]
        if problems:
            raise CheckpointError("\n".join([f"{pretrained_model_name_or_path} does not fit the model:", *problems]))
        return (model, info) if want_info else model

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                cache_params: Cache | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, return_dict: bool | None = None, **kwargs):
        """input_ids (b, l) → logits (b, l, vocab_size).

        ``cache_params``: a ``DynamicCache(config=model.config)``; the tokens are consumed from it and it is
        updated in place (``use_cache=True`` without one makes a fresh one). ``attention_mask``: 1 for tokens,
        0 for (left) padding, over the new tokens or over the cached and the new ones (transformers' way).
        ``labels``: transformers' causal-LM loss (labels are shifted inside; -100 is ignored).
        """
        loss_kwargs = {k: kwargs.pop(k) for k in _LOSS_KWARGS if k in kwargs}
        unsupported = sorted(k for k, v in kwargs.items() if v is not None and v is not False)
        if unsupported:
            raise TypeError(f"BlackMambaForCausalLM.forward does not support {', '.join(unsupported)}")
        if not torch.is_tensor(input_ids) or input_ids.dim() != 2:
            raise ValueError("input_ids must be a (batch, length) tensor of token ids")
        b, l = input_ids.shape
        if cache_params is None and use_cache:
            cache_params = DynamicCache(config=self.config)
        mask = past_mask = None
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[0] != b or attention_mask.shape[1] < l:
                raise ValueError(f"attention_mask must be (batch, length) = ({b}, >= {l}), "
                                 f"got {tuple(attention_mask.shape)}")
            mask = attention_mask[:, -l:]
            if attention_mask.shape[1] > l:
                if cache_params is None:
                    raise ValueError(f"attention_mask is longer ({attention_mask.shape[1]}) than input_ids ({l}) "
                                     f"but there is no cache_params holding the earlier tokens")
                past_mask = attention_mask[:, :-l]
        state = bind_state(cache_params, self.lm, b, past_mask) if cache_params is not None else None
        past = state.seqlen if state is not None else 0
        logits = self.lm(input_ids, state=state, attention_mask=mask).logits[..., : self.config.vocab_size]
        if state is not None:
            commit(cache_params, state, past)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **loss_kwargs)
        out = BlackMambaCausalLMOutput(loss=loss, logits=logits, cache_params=cache_params)
        return out if (return_dict if return_dict is not None else self.config.return_dict) else out.to_tuple()


def _is_release(path_or_id, revision: str | None) -> bool:
    """Whether the checkpoint's config.json is in the release format (it has ``mamba_moe_layers``)."""
    path = Path(str(path_or_id)).expanduser()
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():
            return False
    else:
        from huggingface_hub import hf_hub_download

        try:
            config = Path(hf_hub_download(str(path_or_id), "config.json", revision=revision))
        except Exception:  # not a hub id, offline, ...: transformers reports it in its own words
            return False
    try:
        return "mamba_moe_layers" in json.loads(config.read_text())
    except (OSError, ValueError):
        return False


__all__ = ["BlackMambaCausalLMOutput", "BlackMambaForCausalLM", "BlackMambaPreTrainedModel"]
