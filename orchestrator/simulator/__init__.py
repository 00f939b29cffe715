"""Stand-in Macs, a stand-in Hub and a tiny model: what `orch sandbox` and the tests run against.

Everything here speaks the real protocols so the code under test runs unmodified: `hosts`
(real OpenSSH sshd hosts with macOS command stand-ins in `macos/`), `processes` (their
lifecycle by pid), `hub` / `hubd` / `hubrepo` / `faults` (a local HTTP server speaking the Hub's
protocol, with fault injection), `tiny_model` (a generated deepseek_v3 checkpoint), `cluster` and
`session` (`orch sandbox up/status/down`). Nothing in orch imports it but the CLI.
"""
