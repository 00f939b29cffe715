"""Resources: desired state of one thing on one host that compares itself with facts.

Each is a frozen value whose `diff(facts)` is None when the host already matches, so "no change"
is structural. Modules: `base` (Resource, Change, Step), one family per module — `files`,
`command`, `pyenv`, `sysctl`, `launchd`, `model_files` — and the serving node's pieces:
`layout` (its paths, label and addresses), `wired` (the GPU wired limit), `wheelhouse` (pinned
packages pushed from the controller), `worker` (a serving node's resource list).
"""
