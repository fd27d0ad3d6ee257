"""Emulated hosts for the reliability tests: one network namespace per host, each joined to a
switch namespace (a Linux bridge) by its own veth link, with the link shaped by `tc`.

Everything lives in namespaces the harness creates and deletes itself: the addresses
(10.214.0.0/24) exist only on those links and no traffic reaches the machine's own network.
Each link is shaped on the sending side (the host's egress) with netem (rate and delay); on a
kernel without sch_netem the rate is set with tbf and no delay is added, and `shaping` says so.
A link is cut by taking its switch-side end down (the cable pulled, not the host's interface
removed), so the host keeps its address and TCP resumes when the link comes back.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from cascadeinfer.launcher import Daemon, wait_serving

SUBNET = "10.214.0"


def why_unavailable() -> str | None:
    """Why this machine cannot build the hosts, or None when it can."""
    if os.geteuid() != 0:
        return "network namespaces need root (run as root to emulate hosts)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` (iproute2) is not installed"
    probe = f"cascade-probe-{secrets.token_hex(3)}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"the kernel refused a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str, ns: str | None = None) -> None:
    argv = ["ip", *(["-n", ns] if ns else []), *args]
    subprocess.run(argv, check=True, capture_output=True, text=True)


def _tc(ns: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", ns, "tc", *args], capture_output=True, text=True, check=False
    )


@dataclass
class Host:
    name: str
    namespace: str
    address: str
    switch_port: str
    """The link's end in the switch namespace (taken down to cut the link)."""


@dataclass
class Hosts:
    tag: str
    switch: str
    hosts: dict[str, Host] = field(default_factory=dict)
    shaping: str = ""
    """What shapes each link, e.g. 'netem rate 10gbit delay 0.2ms'."""

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def cut(self, name: str) -> None:
        _ip("link", "set", self.hosts[name].switch_port, "down", ns=self.switch)

    def restore(self, name: str) -> None:
        _ip("link", "set", self.hosts[name].switch_port, "up", ns=self.switch)

    def command(self, name: str, argv: list[str]) -> list[str]:
        """`argv` run on host `name` (ip netns exec replaces itself with it: same pid)."""
        return ["ip", "netns", "exec", self.hosts[name].namespace, *argv]

    def spawn(self, name: str, binary: str, args: list[str], log_dir: Path) -> Daemon:
        """A cascade daemon on host `name`, bound to its link address; waits until it serves."""
        host = self.hosts[name]
        log_path = log_dir / f"{Path(binary).name}-{name}.log"
        with open(log_path, "w") as log:
            process = subprocess.Popen(
                self.command(name, [binary, "--host", host.address, "--port", "0", *args]),
                stdout=log,
                stderr=subprocess.STDOUT,
                text=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        return wait_serving(process, log_path, timeout=120)


def _shape(ns: str, dev: str, rate: str, delay: str) -> str:
    netem = _tc(ns, "qdisc", "add", "dev", dev, "root", "netem", "rate", rate, "delay", delay,
                "limit", "100000")  # fmt: skip
    if netem.returncode == 0:
        return f"netem rate {rate} delay {delay}"
    tbf = _tc(ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate, "burst", "4mb",
              "latency", "10ms")  # fmt: skip
    if tbf.returncode != 0:
        raise RuntimeError(f"tc refused both netem ({netem.stderr}) and tbf ({tbf.stderr})")
    return f"tbf rate {rate}, no delay (this kernel has no sch_netem: {netem.stderr.strip()})"


@contextmanager
def emulated_hosts(names: list[str], rate: str = "10gbit", delay: str = "0.2ms") -> Iterator[Hosts]:
    """Hosts `names` on one switch; every namespace is deleted at the end, whatever happened
    (deleting a namespace deletes its links)."""
    tag = secrets.token_hex(3)
    hosts = Hosts(tag, f"cascade-{tag}-switch")
    made: list[str] = []
    try:
        _ip("netns", "add", hosts.switch)
        made.append(hosts.switch)
        _ip("link", "add", "br0", "type", "bridge", ns=hosts.switch)
        _ip("link", "set", "br0", "up", ns=hosts.switch)
        for k, name in enumerate(names, start=1):
            ns = f"cascade-{tag}-{name}"
            _ip("netns", "add", ns)
            made.append(ns)
            port = f"p{k}"
            # Made in the switch namespace, one end then moved: nothing touches the root one.
            _ip("link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns,
                ns=hosts.switch)  # fmt: skip
            _ip("link", "set", port, "master", "br0", ns=hosts.switch)
            _ip("link", "set", port, "up", ns=hosts.switch)
            address = f"{SUBNET}.{k}"
            _ip("addr", "add", f"{address}/24", "dev", "eth0", ns=ns)
            _ip("link", "set", "eth0", "up", ns=ns)
            _ip("link", "set", "lo", "up", ns=ns)
            hosts.shaping = _shape(ns, "eth0", rate, delay)
            hosts.hosts[name] = Host(name, ns, address, port)
        yield hosts
    finally:
        for ns in reversed(made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
