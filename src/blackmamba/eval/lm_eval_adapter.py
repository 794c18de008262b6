"""lm-evaluation-harness (0.4.x) adapter: ``--model blackmamba``.

    import blackmamba.eval.lm_eval_adapter          # registers "blackmamba" with lm-eval
    lm_eval.simple_evaluate(model="blackmamba", model_args="pretrained=DIR,tokenizer=PATH", tasks=[...])

or ``blackmamba eval DIR --tasks ...``. Model arguments: ``pretrained`` (folder or hub id, or a loaded
``BlackMambaLM``), ``tokenizer`` (tokenizer.json, folder or hub id, or a ``tokenizers.Tokenizer``; default:
the model folder's),
``batch_size``, ``device``, ``dtype``, ``max_gen_toks``, ``quantize`` (int8 | int4), ``group_size``.

- ``loglikelihood``: each distinct context is prefilled once (contexts batched, left-padded); its final
  recurrent state is then copied once per continuation, and the continuations of a batch run together
  (right-padded: padding after a continuation never reaches its scores). No context is truncated: a
  recurrent state has no context limit.
- ``loglikelihood_rolling``: the whole document through the carried state (each token given everything
  before it, the first after the end-of-text token) — ``blackmamba.eval.perplexity.score_tokens``.
- ``generate_until``: ``blackmamba.generation.generate`` (greedy unless ``do_sample``), stopped once a stop
  sequence appears, the text cut before it.
Log-probabilities are over the tokenizer's vocabulary (``config.vocab_size``).
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
from tqdm import tqdm

from ..checkpoint import load_pretrained
from ..generation import generate, pad_prompts
from ..model import BlackMambaLM
from .perplexity import score_tokens
from .tokenizer import load_tokenizer, prefix_token_id

log = logging.getLogger(__name__)

# generation options lm-eval tasks may give that our generator takes as they are
PREFILL_CHUNK = 512  # context positions per forward when prefilling
_GEN_OPTIONS = ("do_sample", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed")


def _device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        log.warning("device %s asked for but CUDA is not available: using the CPU", device)
        return torch.device("cpu")
    return torch.device(device)


@register_model("blackmamba")
class BlackMambaEvalLM(TemplateLM):
    def __init__(self, pretrained: str | BlackMambaLM, tokenizer=None, batch_size: int | str = 1,
                 device: str | None = None, dtype: str = "float32", max_gen_toks: int = 256,
                 quantize: str | None = None, group_size: int | str = 32):
        super().__init__()
        if str(batch_size).startswith("auto"):
            raise ValueError("batch_size=auto is not supported by the blackmamba model: give a number")
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.max_gen_toks = int(max_gen_toks)
        if isinstance(pretrained, BlackMambaLM):
            if tokenizer is None:
                raise ValueError("give tokenizer= (a tokenizers.Tokenizer, a tokenizer.json, a folder or a hub id) "
                                 "with a model object")
            self.model = pretrained.eval()
        else:
            self.model = load_pretrained(pretrained, dtype=dtype, device=_device(device), quantize=quantize or None,
                                         group_size=int(group_size))
        from tokenizers import Tokenizer

        self.tokenizer = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(pretrained, tokenizer)
        self._tokenizer_name = ("tokenizers.Tokenizer" if isinstance(tokenizer, Tokenizer)
                                else str(tokenizer if tokenizer is not None else pretrained))
        prefix = prefix_token_id(self.tokenizer)
        if prefix is None:
            raise ValueError("the tokenizer has no end-of-text (or BOS) special token, which lm-eval needs "
                             "before texts with an empty context")
        self._eot = prefix
        self.vocab_size = self.model.config.vocab_size

    # ------------------------------------------------------------------ tokenizer
    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def tokenizer_name(self) -> str:
        return self._tokenizer_name

    @property
    def device(self):
        return self.model.device

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens)).ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ loglikelihood
    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: [((context, continuation), context tokens, continuation tokens)] → [(log p, is greedy)]."""
        by_context: dict[tuple, list[int]] = defaultdict(list)
        for i, (_, ctx, cont) in enumerate(requests):
            if not ctx:
                raise ValueError("a loglikelihood request has no context tokens")
            by_context[tuple(ctx)].append(i)
        contexts = sorted(by_context, key=len, reverse=True)  # similar lengths share a batch: little padding
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="loglikelihood", disable=disable_tqdm)
        for b in range(0, len(contexts), self.batch_size):
            batch = contexts[b:b + self.batch_size]
            state, last = self._prefill(batch)
            rows = [(row, i) for row, ctx in enumerate(batch) for i in by_context[ctx]]
            for r in range(0, len(rows), self.batch_size):
                part = rows[r:r + self.batch_size]
                for (row, i), score in zip(part, self._score_continuations(state, last, part, requests)):
                    results[i] = score
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], score)
                bar.update(len(part))
        bar.close()
        return results

    def _prefill(self, contexts: list[tuple]) -> tuple:
        """(state after each context, (b, V) logits after its last token); contexts left-padded, and run
        ``PREFILL_CHUNK`` positions at a time so that long contexts never hold all their logits at once."""
        ids, mask = pad_prompts(contexts)
        ids, mask = ids.to(self.device), mask.to(self.device)
        state = self.model.new_state(len(contexts))
        for start in range(0, ids.shape[1], PREFILL_CHUNK):
            last = self.model(ids[:, start:start + PREFILL_CHUNK], state=state,
                              attention_mask=mask[:, start:start + PREFILL_CHUNK]).logits[:, -1]
        return state, last

    def _score_continuations(self, state, last_logits, part, requests) -> list[tuple[float, bool]]:
        """Continue the prefilled rows ``part`` = [(row of the context batch, request index)]."""
        rows = torch.tensor([row for row, _ in part], device=self.device)
        conts = [requests[i][2] for _, i in part]
        longest = max(len(c) for c in conts)
        logits = last_logits.index_select(0, rows)[:, None]  # (n, 1, V): predicts each continuation's first token
        if longest > 1:
            x = torch.zeros(len(conts), longest - 1, dtype=torch.long)
            for j, c in enumerate(conts):
                x[j, : len(c) - 1] = torch.tensor(c[:-1], dtype=torch.long)
            rest = self.model(x.to(self.device), state=state.select(rows)).logits
            logits = torch.cat([logits, rest], dim=1)
        logprobs = F.log_softmax(logits[..., : self.vocab_size].double(), dim=-1)  # float64: exact sums
        out = []
        for j, c in enumerate(conts):
            target = torch.tensor(c, dtype=torch.long, device=self.device)
            lp = logprobs[j, : len(c)]
            out.append((float(lp.gather(1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all())))
        return out

    @torch.no_grad()
    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for req in tqdm(requests, desc="loglikelihood_rolling", disable=disable_tqdm):
            (text,) = req.args
            nll, _ = score_tokens(self.model, self.tok_encode(text), prefix=self.eot_token_id)
            out.append(-nll)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), -nll)
        return out

    # ------------------------------------------------------------------ generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Requests with the same generation options run together, ``batch_size`` prompts at a time."""
        groups: dict[str, list[int]] = defaultdict(list)
        for i, req in enumerate(requests):
            groups[json.dumps(req.args[1], sort_keys=True, default=str)].append(i)
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        out: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm)
        for indices in groups.values():
            gen_kwargs = requests[indices[0]].args[1]
            kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_new = kwargs.pop("max_gen_toks")
            if not kwargs.get("do_sample"):
                kwargs.pop("temperature", None)  # lm-eval sets 0.0 for greedy decoding
            unknown = sorted(set(kwargs) - set(_GEN_OPTIONS))
            if unknown:
                raise ValueError(f"generation options not supported by the blackmamba model: {', '.join(unknown)}")
            for b in range(0, len(indices), self.batch_size):
                part = indices[b:b + self.batch_size]
                prompts = [self.tok_encode(requests[i].args[0]) or [self.eot_token_id] for i in part]
                for i, text in zip(part, self._generate(prompts, until, max_new, kwargs)):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(part))
        bar.close()
        return out

    def _generate(self, prompts: list[list[int]], until: list[str], max_new: int, options: dict) -> list[str]:
        ids, mask = pad_prompts(prompts, pad_id=self.eot_token_id)
        n = ids.shape[1]

        def stop(history: torch.Tensor) -> torch.Tensor:  # (b,) rows whose text holds a stop sequence
            return torch.tensor([any(s in self.tok_decode(row[n:].tolist()) for s in until) for row in history])

        out = generate(self.model, ids, max_new_tokens=max_new, attention_mask=mask, stop=stop,
                       eos_token_id=self.eot_token_id, **options)
        texts = []
        for row in out:
            text = self.tok_decode(row[n:].tolist())
            for s in until:
                if s:
                    text = text.split(s)[0]
            texts.append(text)
        return texts
