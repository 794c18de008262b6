"""``blackmamba serve MODEL``: an OpenAI-compatible HTTP server (``blackmamba.serve``; docs/serving.md).

MODEL is a run directory, a model folder, a release folder or a hub id; the tokenizer is found as ``generate``
finds it. The server listens on 127.0.0.1 unless ``--host`` says otherwise, batches requests continuously, keeps
snapshots of prompt prefixes' states (``--prefix-cache-mb``), and on SIGTERM or Ctrl-C stops accepting
connections, lets running requests finish for up to ``--shutdown-timeout`` seconds, cancels the rest and exits
with status 0.
Needs the ``serve`` extra (``pip install 'blackmamba[serve]'``).
"""

from __future__ import annotations

import argparse
import os
import signal

from . import add_quantize_option


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="run directory, model folder, release folder or hub id (owner/name)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port, printed)")
    p.add_argument("--max-batch", type=int, default=16, help="sequences running at once (default 16)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests waiting beyond those before the server answers 503 (default 256)")
    p.add_argument("--max-context", type=int, default=16384,
                   help="the most prompt + max_tokens tokens a request may ask for (default 16384)")
    p.add_argument("--prefix-cache-mb", type=float, default=512,
                   help="memory for snapshots of prompt prefixes' states (default 512; 0: no cache)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/ (default: $BLACKMAMBA_API_KEY, "
                                     "else no key)")
    p.add_argument("--served-model-name", metavar="NAME", help="the model's name in the API (default: MODEL)")
    p.add_argument("--shutdown-timeout", type=float, default=30,
                   help="seconds running requests get to finish on SIGTERM or Ctrl-C (default 30)")
    p.add_argument("--tokenizer", metavar="FILE_OR_HUB_ID", help="tokenizer.json (or hub id) to use")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    add_quantize_option(p)


def settings(args) -> dict:
    """The engine's settings from the flags, checked by the engine's own validation (a ``UserError`` naming the
    flag) before anything loads."""
    from ..generation import OptionError
    from ..serve.engine import Engine
    from . import UserError

    values = {"max_batch": args.max_batch, "max_queue": args.max_queue, "max_context": args.max_context,
              "prefix_cache_mb": args.prefix_cache_mb}
    try:
        Engine.check_settings(**values)
    except OptionError as e:
        raise UserError("; ".join(f"--{name.replace('_', '-')} {why.removeprefix('= ')}"
                                  for name, why in e.problems)) from None
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port {args.port}: must be in 0..65535")
    if not args.shutdown_timeout >= 0:
        raise UserError(f"--shutdown-timeout {args.shutdown_timeout}: must be >= 0")
    if args.device not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device {args.device!r}: choose auto, cpu or cuda")
    return values


def listen(host: str, port: int):
    """A bound socket (before the model loads: a taken port fails at once, and port 0 is resolved here)."""
    import socket

    from . import UserError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def run(args: argparse.Namespace) -> int:
    from . import UserError

    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise UserError(f"serving needs the serve extra ({e.name} is missing): pip install 'blackmamba[serve]'") \
            from None
    values = settings(args)
    sock = listen(args.host, args.port)
    try:
        from ..checkpoint import resolve_path
        from ..generation import load_model_and_tokenizer
        from ..serve.chat import ChatTemplate
        from ..serve.engine import Engine
        from ..serve.metrics import Metrics
        from ..serve.server import create_app

        model, tok = load_model_and_tokenizer(args.model, args.tokenizer, args.device, args.quantize, args.group_size)
        try:
            template = ChatTemplate.for_folder(resolve_path(args.model))
        except ValueError as e:
            raise UserError(str(e)) from None
        metrics = Metrics()
        engine = Engine(model, tok, metrics=metrics, **values)
        name = args.served_model_name or args.model
        app = create_app(engine, name, api_key=args.api_key or os.environ.get("BLACKMAMBA_API_KEY") or None,
                         metrics=metrics, chat_template=template)
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        print(f"blackmamba serve: {name} on http://{shown}:{port}/v1 (max batch {args.max_batch})", flush=True)
        config = uvicorn.Config(app, log_level="warning", access_log=False,
                                timeout_graceful_shutdown=args.shutdown_timeout)
        # uvicorn shuts down gracefully on SIGTERM or Ctrl-C, then raises the signal again with the handler it
        # found: make those no-ops, so that either ends the process here, with status 0
        handlers = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            uvicorn.Server(config).run(sockets=[sock])
        finally:
            for sig, handler in handlers.items():  # a second Ctrl-C can interrupt what follows
                signal.signal(sig, handler)
        engine.close(cancel=True)
    finally:
        sock.close()
    print("blackmamba serve: stopped", flush=True)
    return 0
