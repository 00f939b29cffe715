"""JSON Schema for the cluster, inventory and playbook files, for editors and CI linters.

The schema is generated from the same pydantic models that validate the files, so it cannot
drift from what `orch validate` accepts (cross-file rules, like unique ring IPs, are beyond
what a schema can say and are only checked by orch).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from orchestrator.config import models

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def json_schemas() -> dict[str, Any]:
    """One document holding the three file schemas under `$defs`, cluster file at the root."""
    documents: dict[str, type[BaseModel]] = {
        "cluster": models.ClusterFile,
        "inventory": models.InventoryFile,
        "playbook": models.PlaybookFile,
    }
    result: dict[str, Any] = {}
    for name, model in documents.items():
        schema = model.model_json_schema(mode="validation")
        schema["$schema"] = SCHEMA_DIALECT
        schema["$id"] = f"https://orch.invalid/schema/{name}.json"
        result[name] = schema
    return result
