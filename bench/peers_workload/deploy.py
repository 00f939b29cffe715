"""pyinfra's side of bench/peers.py: the same converge, as a pyinfra user writes it.

Paths are relative to the login directory (HOME): pyinfra quotes paths, so `~` would not
expand, and each simulated Mac has its own HOME. pyinfra has no `unless`, so the sysctl and
the service are guarded shell one-liners (server.shell always runs and reports a change).
"""

from pyinfra.operations import files, server

for path, mode in (("peers", "755"), ("peers/etc", "755"), ("peers/log", "755"),
                   ("peers/data", "755"), ("peers/run", "700")):
    files.directory(name=f"{path} dir", path=path, mode=mode)

files.template(name="app.conf", src="templates/app.conf.j2", dest="peers/etc/app.conf",
               mode="644", service="peers", listen_port=8400, workers=4)
files.template(name="limits.conf", src="templates/limits.conf.j2",
               dest="peers/etc/limits.conf", mode="600", service="peers", nofile=65536,
               nproc=2048)
files.template(name="service plist", src="templates/service.plist.j2",
               dest="Library/LaunchAgents/com.example.peers.plist", mode="644",
               label="com.example.peers")
server.shell(name="GPU wired limit", commands=[
    'test "$(sysctl -n iogpu.wired_limit_mb)" = 49152'
    " || sudo -n sysctl -w iogpu.wired_limit_mb=49152"])
server.shell(name="service loaded", commands=[
    'launchctl print "user/$(id -u)/com.example.peers" >/dev/null'
    ' || launchctl bootstrap "user/$(id -u)" Library/LaunchAgents/com.example.peers.plist'])
