"""The model as the Hub (or a local directory) describes it: one place for every read of it.

Modules: `safetensors` (headers: every tensor's size from two Range reads), `meta` (bytes per
layer and files per layer range, from config, index and headers), `hub` (the Hub client: tree,
resolve, retries), `manifest` (the pinned revision's files with sizes and sha256, and which
files a node needs), `cache` (the controller's cache of hashes and blobs), `token` (the Hub
token: `HF_TOKEN`, else the file `hf auth login` writes).

Nothing here knows about Macs, placement or hosts; placement and the sync both read it.
"""
