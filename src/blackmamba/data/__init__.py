"""Data: sources (files, folders, globs, JSONL, Parquet, Hugging Face datasets; the embedded Shakespeare default),
tokenizers, and the prepared token shards training reads."""

from .corpus import Corpus, DataError, Document, load_corpus
from .dataset import ShardedTokens, WindowSampler
from .prepare import PreparedData, prepare_data
from .tokenizer import TextTokenizer, load_tokenizer, train_bpe

__all__ = ["Corpus", "DataError", "Document", "TextTokenizer", "PreparedData", "ShardedTokens", "WindowSampler",
           "load_corpus", "load_tokenizer", "prepare_data", "train_bpe"]
