"""Serial provisioning benchmark: end-to-end time and transfer efficiency against the line rate.

    PYTHONPATH=$PWD python tools/bench_provision.py [--baud 115200] [--package-kb 0]

Two real pty pairs joined by a proxy that paces bytes at the line rate of BAUD with 8N1 framing
(BAUD / 10 bytes per second; one thread for both directions, so answers and data never overlap,
which is the pessimistic case), the agent in its own process, a real two-listener mosquitto (the
claim listener with the claim ACL, the mutual-TLS device listener the enrolled device's selftest
connects to with its own certificate) and the enrollment controller. End to end covers hello, info,
keys, configure, enroll, selftest, the package install and finish. Prints one JSON document. Needs
mosquitto (tools/install_test_brokers.sh).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edgert.provision.session import BITS_PER_BYTE, CHUNK_SIZE, HostSession, open_port  # noqa: E402
from edgert.provision.technician import run_flow  # noqa: E402
from edgert.security.keys import parse_public_key  # noqa: E402
from edgert.security.package import create_package  # noqa: E402
from edgert.security.trust import load_publisher_key  # noqa: E402
from tests.provision.ptys import Faults  # noqa: E402
from tests.provision.site import Link, make_site, start_agent, stop_agent  # noqa: E402
from tests.security.kit import source  # noqa: E402


def main() -> None:
    """Run the flow once at the paced line rate and print the numbers."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--baud", type=int, default=115200)
    ap.add_argument("--transfer-kb", type=int, default=256, help="extra raw transfer to measure efficiency")
    args = ap.parse_args()
    line_bps = args.baud / BITS_PER_BYTE
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        site = make_site(tmp)
        link = Link(Faults(bytes_per_s=line_bps))
        agent = start_agent(link.device_path, tmp / "dev", tmp / "etc" / "edgert.toml")
        try:
            with open_port(link.host_path, args.baud) as port:
                host = HostSession(port, baud=args.baud)
                t0 = time.monotonic()
                report = run_flow(host, site.bundle, device_id="bench-1", finish=False)
                out = io.BytesIO()
                create_package(
                    [source(REPO / "models" / "digits_small_int8.onnx")],
                    out,
                    name="digits",
                    version="2",
                    recipients=[parse_public_key(site.fleet.device("bench-1").x25519)],
                    signer=load_publisher_key(site.fleet.publisher_key_path),
                    now=datetime.now(timezone.utc),
                )
                pkg = out.getvalue()
                x0 = time.monotonic()
                host.send_file("digits-2.edgepkg", pkg)
                pkg_s = time.monotonic() - x0
                host.request("install_commit")
                host.request("finish")
                total = time.monotonic() - t0
        finally:
            stop_agent(agent)
            link.close()
        # A longer raw transfer (not installed) for a steadier efficiency figure.
        link2 = Link(Faults(bytes_per_s=line_bps))
        agent2 = start_agent(link2.device_path, tmp / "dev2", tmp / "etc2" / "edgert.toml")
        try:
            with open_port(link2.host_path, args.baud) as port:
                host2 = HostSession(port, baud=args.baud)
                host2.hello()
                host2.request("keys", {"device_id": "bench-2"})
                blob = bytes(range(256)) * (args.transfer_kb * 4)
                x0 = time.monotonic()
                host2.send_file("raw.bin", blob)
                raw_s = time.monotonic() - x0
        finally:
            stop_agent(agent2)
            link2.close()
        site.close()
    print(
        json.dumps(
            {
                "baud": args.baud,
                "line_bytes_per_s": line_bps,
                "chunk_bytes": CHUNK_SIZE,
                "end_to_end_s": round(total, 2),
                "steps_s": {s["step"]: s.get("seconds") for s in report.steps},
                "package_bytes": len(pkg),
                "package_transfer_s": round(pkg_s, 3),
                "package_efficiency": round(len(pkg) / pkg_s / line_bps, 3),
                "raw_transfer_bytes": len(blob),
                "raw_transfer_s": round(raw_s, 3),
                "raw_efficiency": round(len(blob) / raw_s / line_bps, 3),
                "resends": report.resends,
                "enrolled": report.enrolled,
                "broker_reachable": report.broker_reachable,
                "broker_credential": report.broker_credential,
                "selftest_ms": report.selftest_latency_ms,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
