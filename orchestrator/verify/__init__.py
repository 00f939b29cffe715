"""Is the ring serving? Reading ranks on their nodes and asking the API for a real completion.

Modules: `observe` (each rank's launchd job and status file, read through the agent), `health`
(the controller's HTTP client for the ring's API, and what explains a rank that is not ready),
`ring` (`verify_ring`: every rank serving, the ring of the right size, one completion).
"""
