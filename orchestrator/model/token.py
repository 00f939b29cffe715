"""The Hugging Face token: where it is read from, and the rule that it goes nowhere else.

Read (first found): ``HF_TOKEN``; a file the caller names (a configured token file); the file
huggingface_hub writes on ``hf auth login`` (``$HF_TOKEN_PATH``, else ``$HF_HOME/token``, else
``~/.cache/huggingface/token``). The token is sent only as an ``Authorization`` header to the
Hub's own host — in the agent's request on stdin, never in argv — and never written to a plan,
a log event, a node's files or an exception (transfer.py scrubs header values from messages).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

__all__ = ["hub_token", "redact"]


def hub_token(environ: Mapping[str, str] | None = None,
              token_file: Path | None = None) -> str | None:
    env = os.environ if environ is None else environ
    token = (env.get("HF_TOKEN") or "").strip()
    if token:
        return token
    candidates = [token_file] if token_file is not None else []
    if env.get("HF_TOKEN_PATH"):
        candidates.append(Path(env["HF_TOKEN_PATH"]))
    home = env.get("HF_HOME")
    candidates.append(Path(home, "token") if home else
                      Path(env.get("HOME") or Path.home(), ".cache", "huggingface", "token"))
    for path in candidates:
        try:
            token = path.expanduser().read_text().strip()
        except OSError:
            continue
        if token:
            return token
    return None


def redact(text: str, *secrets: str | None) -> str:
    """``text`` with every secret replaced: a last guard on messages that cross the edge."""
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        text = text.replace(secret, "[redacted]")
    return text
