"""The files users write: loading, validation with file:line:col diagnostics, and JSON Schema."""

from orchestrator.config.cluster import (
    Cluster,
    CommandTask,
    CopyTask,
    DirectoryTask,
    Host,
    LaunchdTask,
    ModelSpec,
    PlacementSpec,
    Runtime,
    SSHSettings,
    SysctlTask,
    Task,
    TemplateTask,
)
from orchestrator.config.load import load_cluster
from orchestrator.config.schema import json_schemas

__all__ = [
    "Cluster",
    "CommandTask",
    "CopyTask",
    "DirectoryTask",
    "Host",
    "LaunchdTask",
    "ModelSpec",
    "PlacementSpec",
    "Runtime",
    "SSHSettings",
    "SysctlTask",
    "Task",
    "TemplateTask",
    "json_schemas",
    "load_cluster",
]
