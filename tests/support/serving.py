"""Helpers for the serving tests: a small model folder (random weights, a BPE trained on play-like text, its
tokenizer.json beside it) and a real ``blackmamba serve`` process on 127.0.0.1, bounded in time."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from blackmamba import BlackMambaConfig
from blackmamba.data.tokenizer import train_bpe

from .env import checkout_env
from .models import random_model
from .text import play_text


def small_model_and_tokenizer():
    tok = train_bpe([play_text(i, 120) for i in range(3)], 300)
    cfg = BlackMambaConfig(layers=["r", "4", "r", "4"], hidden_size=32, ffn_hidden_size=64,
                           vocab_size=tok.vocab_size, pad_vocab_size_multiple=16)
    return random_model(cfg, seed=1), tok


def write_model_folder(path: Path) -> Path:
    model, tok = small_model_and_tokenizer()
    model.save_pretrained(path)
    tok.save(path / "tokenizer.json")
    return path


class Server:
    """``blackmamba serve FOLDER --port 0 ...`` as a child process; ``url`` once it answers /health."""

    def __init__(self, folder: Path, *flags: str, timeout: float = 60):
        env = checkout_env(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "blackmamba", "serve", str(folder), "--port", "0",
                                      "--served-model-name", "m", *flags], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env=env)
        line = self.proc.stdout.readline()
        found = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
        if not found:
            self.proc.kill()
            raise RuntimeError(f"the server did not start: {line}{self.proc.stdout.read()}")
        self.base = f"http://127.0.0.1:{found.group(1)}"
        self.url = self.base + "/v1"
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(self.base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError("the server never became healthy")
            time.sleep(0.1)

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 30) -> tuple[int, str]:
        """SIGTERM, then the exit status and what the process printed (killed if it outlives ``timeout``)."""
        if self.proc.poll() is None:
            self.terminate()
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
            return -9, out
        return self.proc.returncode, out
