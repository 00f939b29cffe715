"""Simulated Macs: real OpenSSH sshd hosts with macOS command stand-ins (see `hosts`)."""
