"""Where a checkpoint is: a local folder as it is, or a Hugging Face hub id downloaded (once, into the hub's
cache) through huggingface_hub. Nothing is downloaded for a name that can only be a path."""

from __future__ import annotations

import re
from pathlib import Path

from .errors import CheckpointError
from .release import RELEASE_WEIGHTS

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def resolve_path(path_or_id, revision: str | None = None) -> Path:
    """A local folder as is; a hub id ("Zyphra/BlackMamba-1.5B") downloaded through huggingface_hub.

    A name that can only be a path (``./x``, ``/x``, ``~/x``, ``a/b/c``, or ``runs/x`` where ``runs`` is a local
    folder) is never looked up on the hub: its absence is reported as a missing folder. For ``owner/name`` that
    is neither here nor on the hub, the error says both."""
    spec = str(path_or_id)
    p = Path(spec).expanduser()
    if p.exists():
        if not p.is_dir():
            raise CheckpointError(f"{p}: not a folder (give the folder holding config.json)")
        return p
    first = Path(spec).parts[0] if Path(spec).parts else ""
    local = spec.startswith((".", "/", "~")) or not _HUB_ID.match(spec) or Path(first).is_dir()
    if local:
        raise CheckpointError(f"{spec}: no such folder ({p.absolute()} does not exist)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(spec, revision=revision,
                                      allow_patterns=["*.json", "*.safetensors", RELEASE_WEIGHTS, "*.txt"]))
    except Exception as e:  # network, auth, missing repo: one clear line
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CheckpointError(f"{spec}: no such local folder ({p.absolute()} does not exist), and it could not be "
                              f"fetched from the Hugging Face hub as a model id ({type(e).__name__}: {why})") from None
