"""Model files: downloaded once, spread over the LAN, each node holding exactly what it needs.

The data flow of DESIGN.md, for model bytes:

* `manifest` — the pinned revision's files with sizes and sha256 (the Hub's tree API, or a
  local ``model.path`` hashed on the controller), and the rule for which files a node needs;
* `orchestrator.resources.model_files.ModelFiles` — the resource: a node's needed files present
  and verified (hashes from the agent's cache, so a converged node reads no data);
* `schedule` — pure: which source each copy comes from (one copy per file from the origin,
  every other copy from a peer, spread as a tree);
* `transfers` — apply time: peer servers, fetches in dependency order, fallbacks, byte
  accounting; `progress` — bars or events while it runs; `credentials` — the Hub token.

The engine calls `assign_sources` once per plan and `for_plan` once per apply.
"""

from orchestrator.sync.credentials import hub_token
from orchestrator.sync.manifest import (
    Entry,
    HubOrigin,
    LocalOrigin,
    Manifest,
    hub_manifest,
    local_manifest,
    needed_files,
)
from orchestrator.sync.schedule import assign_sources, holders_of
from orchestrator.sync.transfers import (
    DEFAULT_SYNC_PORT,
    FetchRecord,
    Peer,
    TransferContext,
    for_plan,
    summary_text,
)

__all__ = [
    "DEFAULT_SYNC_PORT",
    "Entry",
    "FetchRecord",
    "HubOrigin",
    "LocalOrigin",
    "Manifest",
    "Peer",
    "TransferContext",
    "assign_sources",
    "for_plan",
    "holders_of",
    "hub_manifest",
    "hub_token",
    "local_manifest",
    "needed_files",
    "summary_text",
]
