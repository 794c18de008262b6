"""``BlackMambaForCausalLM``: the core ``BlackMambaLM`` behind transformers' ``PreTrainedModel`` API.

A thin adapter, not a second implementation: the model's top-level modules *are* the core model's
``embedding`` and ``decoder`` (the same objects), so the state dict — and the safetensors file that
``save_pretrained`` writes — holds exactly the native / release keys (``embedding.word_embeddings.weight``,
``decoder.layers.{i}.mixer.in_proj.weight``, ...), and ``forward`` runs the core model (``model.lm``).

- ``generate()`` keeps the recurrent state in a ``BlackMambaCache`` (a transformers ``Cache`` over the core
  ``State``, see ``blackmamba.hf.cache``), which the forward creates on the first call: greedy, sampling, beam
  search, streamers, stopping criteria. transformers 5.24 and later pass the cache as ``cache``, 5.23 as
  ``cache_params``; the forward takes either and returns it under the name the installed release reads.
  Within a ``generate()`` call the one-token steps run the core model's decode step with the weights bound once
  for the call (``BlackMambaLM.bind_step``; on a CPU the block loop replayed, docs/kernels.md), as blackmamba's
  own ``generate`` does, rather than binding them every token.
- Logits are cut to ``config.vocab_size``: the padded embedding rows are never tokens.
- ``from_pretrained`` loads transformers / native folders (they are the same format) and, through
  ``blackmamba.load_pretrained``, release-format folders and hub ids (``Zyphra/BlackMamba-1.5B``).
- Loading is strict: a checkpoint with missing, unexpected or misshaped tensors raises ``CheckpointError``.

``save_pretrained`` copies this file and its relative imports (configuration.py, cache.py) next to the weights
for ``trust_remote_code``; the core package is imported by absolute name.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path

import torch
import transformers
from packaging.version import Version
from transformers import GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput

from blackmamba.checkpoint import CheckpointError, load_pretrained
from blackmamba.model import SSM_PARAMETERS, BlackMambaLM

from .cache import BlackMambaCache
from .configuration import BlackMambaConfig

# keyword arguments that transformers' loss function takes from the Trainer
_LOSS_KWARGS = ("num_items_in_batch",)
# transformers 5.24 renamed every model's cache argument and output field to ``cache``; 5.23 calls a Mamba-style
# model's cache ``cache_params`` (and finds it in the output under that name)
CACHE_FIELD = "cache" if Version(transformers.__version__) >= Version("5.24.0.dev0") else "cache_params"


# id(model) → [its decode step bound for the generate() call running in this thread, or None until the first
# step binds it] (see BlackMambaForCausalLM.generate)
_GENERATING = threading.local()


# loss, logits (b, l, vocab_size) and the cache, under CACHE_FIELD (a dataclass field of that one name: on 5.24 a
# field named cache_params would shadow ModelOutput's alias of it)
BlackMambaCausalLMOutput = dataclasses.make_dataclass(
    "BlackMambaCausalLMOutput",
    [("loss", "torch.Tensor | None", None), ("logits", "torch.Tensor | None", None),
     (CACHE_FIELD, "BlackMambaCache | None", None)],
    bases=(ModelOutput,), namespace={"__module__": __name__})


class BlackMambaPreTrainedModel(PreTrainedModel):
    config_class = BlackMambaConfig
    config: BlackMambaConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]
    _is_stateful = True  # a recurrent state cannot be rolled back: no assisted generation
    # the SSM parameters stay fp32 in bf16 / fp16 models, as in blackmamba.load_pretrained
    _keep_in_fp32_modules_strict = [f"mixer.{name}" for name in SSM_PARAMETERS]

    def _init_weights(self, module):
        # The core model initialises itself when constructed; loading is strict, so no weight is ever left
        # for transformers to fill in.
        pass

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # generate() must not make a DynamicCache: the forward makes its own BlackMambaCache (transformers'
        # route for models that supply their cache, as its Mamba-style models did)
        return False


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
        """Wrap a core model; the weights are shared, not copied. A quantized model is refused: transformers'
        and PEFT's code (training, resizing, saving) expects weight tensors."""
        if lm.quantization is not None:
            raise CheckpointError(f"a {lm.quantization.mode} quantized model cannot be wrapped for transformers: "
                                  f"use blackmamba's own generate / eval / serve, or the full-precision checkpoint")
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
        """A transformers / native folder or hub id, or a release-format one (``Zyphra/BlackMamba-1.5B``); not a
        quantized one (``from_core``)."""
        from blackmamba.quantize import QUANTIZATION_NAME, is_quantized_tensor

        quantized = CheckpointError(f"{pretrained_model_name_or_path} holds quantized weights: load it with "
                                    f"blackmamba.load_pretrained (inference); transformers needs a full-precision one")
        if (Path(str(pretrained_model_name_or_path)) / QUANTIZATION_NAME).is_file():
            raise quantized
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
        if any(is_quantized_tensor(k) for k in info["unexpected_keys"]):  # (a hub repo: known once downloaded)
            raise quantized
        problems = [f"  {what} tensor {key}" for what, keys in (("missing", info["missing_keys"]),
                                                                ("unexpected", info["unexpected_keys"]))
                    for key in sorted(keys)]
        problems += [f"  wrong shape for {m[0] if isinstance(m, tuple) else m}" for m in info["mismatched_keys"]]
        if problems:
            raise CheckpointError("\n".join([f"{pretrained_model_name_or_path} does not fit the model:", *problems]))
        return (model, info) if want_info else model

    # ------------------------------------------------------------------ generate and forward
    def generate(self, *args, **kwargs):
        """transformers' ``generate``, its one-token steps made by the core model's decode step bound once for
        this call (``BlackMambaLM.bind_step``: the weights cannot change within it) instead of once a token."""
        if not hasattr(_GENERATING, "steps"):
            _GENERATING.steps = {}
        bound = _GENERATING.steps
        outer = bound.get(id(self))  # a generate() within a generate() (a logits processor's, say) keeps its own
        bound[id(self)] = [None]  # bound at the first one-token step (none without a cache)
        try:
            return super().generate(*args, **kwargs)
        finally:
            if outer is None:
                del bound[id(self)]
            else:
                bound[id(self)] = outer

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                cache: BlackMambaCache | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, return_dict: bool | None = None,
                cache_params: BlackMambaCache | None = None, **kwargs):
        """input_ids (b, l) → logits (b, l, vocab_size).

        ``cache`` (``cache_params`` on transformers 5.23): a ``BlackMambaCache``; the tokens are consumed from it
        and it is updated in place (``use_cache=True`` without one makes a fresh one, returned in the output).
        ``attention_mask``: 1 for tokens, 0 for (left) padding, over the new tokens or over the cached and the new
        ones (transformers' way). ``labels``: transformers' causal-LM loss (shifted inside; -100 is ignored).
        """
        loss_kwargs = {k: kwargs.pop(k) for k in _LOSS_KWARGS if k in kwargs}
        unsupported = sorted(k for k, v in kwargs.items() if v is not None and v is not False)
        if unsupported:
            raise TypeError(f"BlackMambaForCausalLM.forward does not support {', '.join(unsupported)}")
        if not torch.is_tensor(input_ids) or input_ids.dim() != 2:
            raise ValueError("input_ids must be a (batch, length) tensor of token ids")
        b, l = input_ids.shape
        if cache is None:
            cache = cache_params
        if cache is None and use_cache:
            cache = BlackMambaCache()
        if cache is not None and not isinstance(cache, BlackMambaCache):
            raise TypeError(f"the cache must be a BlackMambaCache (blackmamba.hf.BlackMambaCache()), not "
                            f"{type(cache).__name__}: a BlackMamba model keeps recurrent states")
        if cache is not None and cache.state is None:
            cache.state = self.lm.new_state(b)
        past = cache.get_seq_length() if cache is not None else 0
        if cache is not None and cache.state.batch_size != b:
            raise ValueError(f"the cache holds {cache.state.batch_size} sequences, but input_ids has batch size {b}")
        mask = None
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[0] != b or \
                    attention_mask.shape[1] not in (l, past + l):
                raise ValueError(f"attention_mask must be (batch, length) = ({b}, {l}) over the new tokens, or "
                                 f"({b}, {past + l}) over the {past} cached and the new ones; got "
                                 f"{tuple(attention_mask.shape)}")
            mask = attention_mask[:, -l:]
        step = None
        bound = getattr(_GENERATING, "steps", {}).get(id(self))
        if bound is not None and cache is not None and l == 1:  # within generate(): the step bound for the call
            if bound[0] is None:
                bound[0] = self.lm.bind_step()
            step = bound[0]
        logits = self.lm(input_ids, state=cache.state if cache is not None else None, attention_mask=mask,
                         bound_step=step).logits[..., : self.config.vocab_size]
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **loss_kwargs)
        out = BlackMambaCausalLMOutput(loss=loss, logits=logits, **{CACHE_FIELD: cache})
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


__all__ = ["BlackMambaCache", "BlackMambaCausalLMOutput", "BlackMambaForCausalLM", "BlackMambaPreTrainedModel"]
