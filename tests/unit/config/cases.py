"""Broken cluster/inventory/playbook files, one per class of mistake.

Each case is a set of files; `»` marks the exact spot the error must point at (it is removed
before the file is written). `schema` says whether the JSON Schema alone can reject the case
(cross-file rules such as unique ring IPs are beyond what a schema can express).
"""

from __future__ import annotations

from dataclasses import dataclass, field

SHA = "0123456789abcdef0123456789abcdef01234567"

CLUSTER = f"""\
name: lab
inventory: inv.yml
model:
  repo: mlx-community/tiny
  revision: {SHA}
"""

INVENTORY = """\
hosts:
  a:
    address: 10.0.0.1
    ring_ip: 10.1.0.1
    memory_gb: 64
  b:
    address: 10.0.0.2
    ring_ip: 10.1.0.2
    memory_gb: 64
"""


TEMPLATE_TASK = "tasks:\n  - name: t\n    template: {src: motd.j2, dest: /etc/motd}\n"


@dataclass(frozen=True)
class Case:
    id: str
    files: dict[str, str]
    message: str  # a fragment the diagnostic must contain
    schema: bool = False  # the JSON Schema alone rejects it
    extra: dict[str, str] = field(default_factory=dict)


def _c(**files: str) -> dict[str, str]:
    base = {"cluster.yml": CLUSTER, "inv.yml": INVENTORY}
    base.update({k.replace("_yml", ".yml").replace("_j2", ".j2"): v for k, v in files.items()})
    return base


CASES = [
    Case("unknown-top-level-key", _c(cluster_yml=CLUSTER + "»modle: {}\n"),
         "unknown key 'modle'", schema=True),
    Case("unknown-model-key", _c(cluster_yml=CLUSTER.replace("  revision", "  »revison")),
         "did you mean 'revision'", schema=True),
    Case("unknown-host-key", _c(inv_yml=INVENTORY + "    »colour: red\n"),
         "unknown key 'colour'", schema=True),
    Case("unknown-group-var", _c(inv_yml=INVENTORY + "groups:\n  g:\n    hosts: [a]\n"
                                 "    vars:\n      »memroy_gb: 64\n"),
         "unknown key 'memroy_gb' (did you mean 'memory_gb'?)"),
    Case("port-is-string", _c(inv_yml=INVENTORY.replace(
        "    memory_gb: 64\n  b", "    memory_gb: 64\n    port: »\"22\"\n  b")),
         "expected an integer", schema=True),
    Case("memory-is-string", _c(inv_yml=INVENTORY.replace(
        "memory_gb: 64\n  b", "memory_gb: »64 GB\n  b")), "expected a number", schema=True),
    Case("drained-is-string", _c(inv_yml=INVENTORY + "    drained: »\"no\"\n"),
         "expected true or false", schema=True),
    Case("hosts-is-a-list", _c(inv_yml="hosts: »[a, b]\n"), "expected a mapping", schema=True),
    Case("duplicate-key-cluster", _c(cluster_yml=CLUSTER + "»name: lab2\n"),
         "duplicate key 'name' (first defined at line 1)"),
    Case("duplicate-host", _c(inv_yml=INVENTORY + "  »a:\n    address: x\n    ring_ip: 10.1.0.9\n"),
         "duplicate key 'a'"),
    Case("duplicate-ring-ip", _c(inv_yml=INVENTORY.replace(
        "ring_ip: 10.1.0.2", "ring_ip: »10.1.0.1")), "already used by host 'a'"),
    Case("duplicate-address", _c(inv_yml=INVENTORY.replace(
        "address: 10.0.0.2", "address: »10.0.0.1")), "already host 'a'"),
    Case("ring-ip-not-an-ip", _c(inv_yml=INVENTORY.replace(
        "ring_ip: 10.1.0.2", "ring_ip: »mac-b.local")), "is not an IP address"),
    Case("address-bad-ip", _c(inv_yml=INVENTORY.replace(
        "address: 10.0.0.2", "address: »10.0.0.300")), "not a valid IP address"),
    Case("port-out-of-range", _c(inv_yml=INVENTORY + "    port: »70000\n"),
         "less than or equal to 65535", schema=True),
    Case("ports-shared", _c(cluster_yml=CLUSTER + "runtime:\n  »sync_port: 8080\n"),
         "sync_port and api_port are both 8080"),
    Case("api-port-zero", _c(cluster_yml=CLUSTER + "runtime:\n  api_port: »0\n"),
         "greater than or equal to 1", schema=True),
    Case("inventory-missing", _c(cluster_yml=CLUSTER.replace("inventory: inv.yml",
                                                             "inventory: »nope.yml")),
         "inventory file 'nope.yml' does not exist"),
    Case("identity-file-missing", _c(inv_yml=INVENTORY + "    identity_file: »keys/id_none\n"),
         "identity file 'keys/id_none' does not exist"),
    Case("model-path-missing", _c(cluster_yml=CLUSTER.replace(
        "  repo: mlx-community/tiny\n", "  path: »models/none\n")), "model directory"),
    Case("placement-node-unknown", _c(cluster_yml=CLUSTER + "placement:\n  nodes: [a, »zz]\n"),
         "placement node 'zz' is not in the inventory"),
    Case("placement-node-twice", _c(cluster_yml=CLUSTER + "placement:\n  nodes: [a, »a]\n"),
         "listed twice"),
    Case("placement-nodes-word", _c(cluster_yml=CLUSTER + "placement:\n  nodes: »all\n"),
         "'auto'", schema=True),
    Case("reserve-negative", _c(cluster_yml=CLUSTER + "placement:\n  reserve_gb: »-4\n"),
         "greater than or equal to 0", schema=True),
    Case("package-unpinned", _c(cluster_yml=CLUSTER + "runtime:\n  packages: [»mlx>=0.30]\n"),
         "is not pinned"),
    Case("ring-ip-missing", _c(inv_yml=INVENTORY.replace("    ring_ip: 10.1.0.2\n", "")
                               .replace("  b:", "  »b:")), "has no `ring_ip`"),
    Case("memory-nowhere", _c(inv_yml=INVENTORY.replace("    memory_gb: 64\n  b", "  b")
                              .replace("  a:", "  »a:")), "has no `memory_gb`"),
    Case("yaml-syntax", _c(cluster_yml=CLUSTER + "placement: [\n  »:\n"), "YAML syntax error"),
    Case("task-two-kinds", _c(cluster_yml=CLUSTER + "tasks:\n  - »name: t\n    command: [ls]\n"
                              "    directory: {path: /x}\n"), "exactly one of"),
    Case("task-command-string", _c(cluster_yml=CLUSTER + "tasks:\n  - name: t\n"
                                   "    command: »rm -rf /tmp/x\n"), "expected a list",
         schema=True),
    Case("template-missing", _c(cluster_yml=CLUSTER + "tasks:\n  - name: t\n    template:\n"
                                "      src: »motd.j2\n      dest: /etc/motd\n"),
         "template 'motd.j2' does not exist"),
    Case("copy-source-missing", _c(cluster_yml=CLUSTER + "tasks:\n  - name: t\n    copy:\n"
                                   "      src: »files/blob.bin\n      dest: ~/blob.bin\n"),
         "copy source 'files/blob.bin' does not exist"),
    Case("template-syntax", _c(cluster_yml=CLUSTER + TEMPLATE_TASK,
                               motd_j2="hello {{ host.name }}\n»{% if %}\n"),
         "template syntax error: Expected an expression, got 'end of statement block'; "
         "expected jinja2 syntax (task at "),
    Case("template-include-syntax", _c(cluster_yml=CLUSTER + TEMPLATE_TASK,
                                       motd_j2="{% include 'part.j2' %}\n",
                                       part_j2="a\nb\n»{{ host.name }\n"),
         "template syntax error: unexpected '}'"),
    Case("template-include-missing", _c(cluster_yml=CLUSTER + TEMPLATE_TASK,
                                        motd_j2="a\n{% include '»nowhere.j2' %}\n"),
         "template 'nowhere.j2' is not found; expected a file beside motd.j2"),
    Case("template-include-climbs-out", _c(cluster_yml=CLUSTER + TEMPLATE_TASK,
                                           motd_j2="{% include '»../inv.yml' %}\n"),
         "template '../inv.yml' is not found"),
    Case("playbook-missing", _c(cluster_yml=CLUSTER + "playbooks: [»extra.yml]\n"),
         "playbook 'extra.yml' does not exist"),
    Case("playbook-unknown-key", _c(cluster_yml=CLUSTER + "playbooks: [extra.yml]\n",
                                    extra_yml="tasks:\n  - name: t\n    »comand: [ls]\n"),
         "did you mean 'command'"),
    Case("task-target-unknown", _c(cluster_yml=CLUSTER + "tasks:\n  - name: t\n"
                                   "    hosts: [»c]\n    command: [ls]\n"),
         "neither a host nor a group"),
    Case("inventory-and-hosts", _c(cluster_yml="»name: lab\ninventory: inv.yml\nhosts: {}\n"
                                   f"model: {{repo: a/b, revision: {SHA}}}\n"),
         "exactly one of `inventory`"),
    Case("model-no-source", _c(cluster_yml=CLUSTER.replace(
        f"model:\n  repo: mlx-community/tiny\n  revision: {SHA}\n",
        f"model:\n  »revision: {SHA}\n")), "needs `repo`"),
    Case("group-member-unknown", _c(inv_yml=INVENTORY + "groups:\n  g:\n    hosts: [a, »q]\n"),
         "group member 'q' is not a host"),
    Case("repo-malformed", _c(cluster_yml=CLUSTER.replace(
        "repo: mlx-community/tiny", "repo: »not a repo")), "should match pattern", schema=True),
    Case("sysctl-value-bool", _c(cluster_yml=CLUSTER + "tasks:\n  - name: t\n    sysctl: "
                                 "{name: iogpu.wired_limit_mb, value: »true}\n"),
         "expected an integer, got bool True", schema=True),
    Case("sysctl-name-not-a-sysctl", _c(cluster_yml=CLUSTER + "tasks:\n  - name: t\n"
                                        "    sysctl: {name: »-w, value: 1}\n"),
         "should match pattern", schema=True),
    Case("sysctl-key-misspelt", _c(cluster_yml=CLUSTER + "tasks:\n  - name: t\n    sysctl: "
                                   "{name: kern.maxfiles, value: 1, »persistent: true}\n"),
         "did you mean 'persist'", schema=True),
    Case("launchd-domain-gui", _c(cluster_yml=CLUSTER + "tasks:\n  - name: t\n    launchd: "
                                  "{plist: a.plist, label: a, domain: »gui}\n"),
         "'user' or 'system'", schema=True),
    Case("launchd-no-label", _c(cluster_yml=CLUSTER + "tasks:\n  - name: t\n"
                                "    »launchd: {plist: ~/Library/LaunchAgents/a.plist}\n"),
         "no `label`, and no earlier template or copy task writes"),
    Case("launchd-plist-written-after", _c(
        cluster_yml=CLUSTER + "tasks:\n  - name: job\n"
        "    launchd: {plist: »~/a.plist, label: a}\n"
        "  - name: its plist\n    template: {src: motd.j2, dest: ~/a.plist}\n",
        motd_j2="x\n"),
         "is written by task 'its plist' after this one"),
]
