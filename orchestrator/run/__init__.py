"""Running against hosts: the engine that sequences a run, apply, the lock, model transfers.

Modules: `engine` (connect, facts, plan, lock, apply, verify: the only module that sequences the
stages), `apply` (each host's changes in order; the managed record widened first), `lock` (one
apply per cluster, held on the hosts), `transfers` (model files: peer servers, fetches, byte
accounting), `progress` (bars or events while files move).
"""
