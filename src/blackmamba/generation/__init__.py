"""Generation: sampling options (``sampling``), decoding from the recurrent state (``generate``), the ``Stepper``
that runs ``model.step`` (a CUDA graph where it can be), and text in / text out (``text``)."""

from .generate import generate, pad_prompts, stream
from .sampling import OptionError, check_options, process_logits
from .stepper import Stepper
from .text import TextStream, check_prompt, encode_prompt, generate_text, load_model_and_tokenizer, stream_text

__all__ = ["OptionError", "Stepper", "TextStream", "check_options", "check_prompt", "encode_prompt", "generate", "generate_text",
           "load_model_and_tokenizer", "pad_prompts", "process_logits", "stream", "stream_text"]
