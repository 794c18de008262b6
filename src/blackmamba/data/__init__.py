"""Data: corpora (the embedded Shakespeare default or the user's text files), tokenizers, token datasets."""

from .corpus import Corpus, DataError, Document, load_corpus
from .dataset import TokenFile, WindowSampler
from .prepare import PreparedData, prepare_data
from .tokenizer import TextTokenizer, load_tokenizer, train_bpe

__all__ = ["Corpus", "DataError", "Document", "TextTokenizer", "PreparedData", "TokenFile", "WindowSampler",
           "load_corpus", "load_tokenizer", "prepare_data", "train_bpe"]
