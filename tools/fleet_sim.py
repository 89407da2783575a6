#!/usr/bin/env python3
"""Fleet simulator and rollout benchmark: N simulated devices in P processes against a real broker.

    python3 tools/fleet_sim.py --devices 1000 [--procs P] [--fleet DIR] [--broker host:port] \
        [--group G] [--model NAME --version V --model-file FILE] [--waves 1%,10%,50%,100%] \
        [--fail-fraction 0.2 [--broken-model FILE]] [--report out.json]

Each simulated device runs the real SyncService and DeviceUpdater over its own MQTT connection, with
its own keys, store and state dir (see tools/fleet_sim_device.py for what is shared per process).
Without ``--broker`` a mosquitto is started (``max_queued_messages 0``, ``sys_interval 1``); without
``--fleet`` a fleet is made with ``edgert fleet init``. The tool publishes ``--version`` (``edgert fleet
model add``, escrow only: devices fetch their wrapped key on demand), starts the real controller
(``edgert fleet serve``), runs ``edgert fleet deploy`` and waits until the rollout completes or halts.
It prints a JSON report: total and per-wave times, the controller's and broker's CPU seconds (psutil),
the broker's message and byte counters ($SYS), the simulator processes' CPU, and per-device outcomes.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(HERE), str(REPO)]

#: How long the simulator waits for devices to be set up, for the controller to see them, and for the
#: rollout (seconds); all overridable on the command line.
SETUP_TIMEOUT_S = 900.0
SEEN_TIMEOUT_S = 300.0
ROLLOUT_TIMEOUT_S = 900.0
#: Stop of one worker process (devices publish their graceful offline status in parallel).
STOP_TIMEOUT_S = 120.0
STOP_THREADS = 64
POLL_S = 0.2
#: Simulated devices per process at most. paho's loop() waits with select(), which cannot watch a file
#: descriptor >= 1024 (FD_SETSIZE); a device holds about 10 (socket, SQLite spool and nonce files,
#: keys, audit), so past ~100 devices a process's new connections fail. More processes are used instead.
MAX_DEVICES_PER_PROC = 90
SYS_TOPICS = ("messages/received", "messages/sent", "publish/messages/received", "publish/messages/sent",
              "bytes/received", "bytes/sent", "clients/connected")


# -- worker processes ---------------------------------------------------------------------------------
def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def worker(index: int, ids: list[str], faulty: list[str], spec: Any, root: str, out: Any, stop: Any) -> None:
    """One simulator process: set up its devices, start them, report, and stop when told."""
    import logging
    from concurrent.futures import ThreadPoolExecutor

    from fleet_sim_device import ProcessShared, SimDevice

    from edgert.fleet.fleetdir import FleetDir

    _raise_nofile()
    Path(root).mkdir(parents=True, exist_ok=True)
    logging.basicConfig(filename=str(Path(root) / f"worker-{index}.log"), level=logging.WARNING)
    bad = set(faulty)
    devices = []
    shared = None
    try:
        fleet = FleetDir.open(spec.fleet_dir)
        shared = ProcessShared(spec.profile, fleet)
        for d in ids:
            devices.append(SimDevice(Path(root), d, spec, shared, fleet, faulty=d in bad))
        for dev in devices:
            dev.start()
        out.put(("ready", index, len(devices)))
        stop.wait()
        summaries = [dev.summary() for dev in devices]
        with ThreadPoolExecutor(STOP_THREADS) as pool:
            list(pool.map(lambda dev: dev.stop(), devices))
        out.put(("done", index, {"devices": summaries, "shared_loads": shared.loads}))
    except BaseException as exc:  # tell the parent instead of hanging it
        out.put(("error", index, f"{type(exc).__name__}: {exc}"))
        raise
    finally:
        if shared is not None:
            shared.close()


# -- broker -------------------------------------------------------------------------------------------
class Broker:
    """A mosquitto for the run: no queue limits (many QoS 1 messages), $SYS every second."""

    def __init__(self, directory: Path) -> None:
        import pwd
        import socket

        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        conf = directory / "mosquitto.conf"
        conf.write_text("\n".join([
            f"listener {self.port} 127.0.0.1", f"user {pwd.getpwuid(os.getuid()).pw_name}",
            "allow_anonymous true", "max_queued_messages 0", "max_inflight_messages 0", "sys_interval 1",
            "persistence false", "log_dest stderr", "log_type error", "log_type warning"]) + "\n")
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.log = open(directory / "mosquitto.log", "ab")
        self.proc = subprocess.Popen([exe, "-c", str(conf)], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), 0.2):
                    break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(
                        f"mosquitto did not start: {(directory / 'mosquitto.log').read_text()}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        """Stop by PID."""
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


class SysCounters:
    """The broker's $SYS counters, as last published (mosquitto ``sys_interval``)."""

    def __init__(self, host: str, port: int) -> None:
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        self.values: dict[str, float] = {}
        self.updates = 0
        self._cv = threading.Condition()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"fleet-sim-sys-{os.getpid()}")
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe("$SYS/broker/#")
        self.client.on_message = self._on_message
        self.client.connect(host, port, 30)
        self.client.loop_start()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        key = msg.topic.removeprefix("$SYS/broker/")
        if key in SYS_TOPICS:
            try:
                value = float(msg.payload)
            except ValueError:
                return
            with self._cv:
                self.values[key] = value
                self.updates += 1
                self._cv.notify_all()

    def fresh(self, timeout: float = 5.0) -> dict[str, float] | None:
        """Counters from a publication that started after this call; None if none came (no sys_interval)."""
        with self._cv:
            seen = self.updates
            if not self._cv.wait_for(lambda: self.updates >= seen + len(SYS_TOPICS), timeout):
                return None
            return dict(self.values)

    def close(self) -> None:
        """Disconnect."""
        self.client.disconnect()
        self.client.loop_stop()


# -- the run ------------------------------------------------------------------------------------------
def edgert(*args: str, check: bool = True) -> str:
    """Run the real ``edgert`` CLI (this tree) and return its stdout."""
    r = subprocess.run([sys.executable, "-m", "edgert.cli.main", *args], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get(
                           "PYTHONPATH", "")])})
    if check and r.returncode != 0:
        raise SystemExit(f"edgert {' '.join(args)} failed ({r.returncode}):\n{r.stdout}{r.stderr}")
    return r.stdout


def _cpu(pids: list[int]) -> float:
    import psutil

    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except psutil.Error:
            pass
    return total


def _rss_mb(pids: list[int]) -> float:
    import psutil

    total = 0
    for pid in pids:
        try:
            total += psutil.Process(pid).memory_info().rss
        except psutil.Error:
            pass
    return round(total / 2**20, 1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--devices", type=int, required=True)
    p.add_argument("--procs", type=int, default=None,
                   help=f"Simulator processes (default: CPU count, at least devices/{MAX_DEVICES_PER_PROC}).")
    p.add_argument("--fleet", type=Path, default=None, help="An existing fleet directory (else made).")
    p.add_argument("--broker", default=None, help="host:port of a running broker (else started).")
    p.add_argument("--group", default="sim")
    p.add_argument("--model", default="digits")
    p.add_argument("--base-version", default="1")
    p.add_argument("--base-model", type=Path, default=REPO / "models" / "digits_small_int8.onnx")
    p.add_argument("--version", default="2")
    p.add_argument("--model-file", type=Path, default=REPO / "models" / "digits_large_int8.onnx")
    p.add_argument("--waves", default="1%,10%,50%,100%")
    p.add_argument("--wait-healthy", default="5m")
    p.add_argument("--max-failure-rate", default="5%")
    p.add_argument("--min-attempts", type=int, default=None)
    p.add_argument("--fail-fraction", type=float, default=0.0, help="Share of devices whose runtime fails.")
    p.add_argument("--broken-model", type=Path, default=None,
                   help="Faulty devices load this model file for the new version (default: runs that raise).")
    p.add_argument("--work-dir", type=Path, default=None, help="Keep device state here (default: temp).")
    p.add_argument("--no-rollout", action="store_true", help="Only run the devices until Ctrl-C.")
    p.add_argument("--setup-timeout", type=float, default=SETUP_TIMEOUT_S)
    p.add_argument("--rollout-timeout", type=float, default=ROLLOUT_TIMEOUT_S)
    p.add_argument("--report", type=Path, default=None, help="Also write the JSON report here.")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the simulation; exit 0 when the rollout ended as expected (complete, or halted with faults)."""
    from fleet_sim_device import DeviceSpec

    args = parse_args(argv)
    need = -(-args.devices // MAX_DEVICES_PER_PROC)
    if args.procs is None:
        args.procs = max(os.cpu_count() or 1, need)
    elif args.procs < need:
        print(f"--procs {args.procs} raised to {need}: at most {MAX_DEVICES_PER_PROC} devices per process "
              "(paho's select() loop)", file=sys.stderr)
        args.procs = need
    _raise_nofile()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="fleet-sim-"))
    work.mkdir(parents=True, exist_ok=True)
    broker: Broker | None = None
    procs: list[Any] = []
    controller: subprocess.Popen[bytes] | None = None
    stop = mp.get_context("spawn").Event()
    report: dict[str, Any] = {"devices": args.devices, "procs": args.procs, "work_dir": str(work)}
    try:
        if args.broker:
            host, _, port_text = args.broker.rpartition(":")
            host, port = host or "127.0.0.1", int(port_text)
        elif args.fleet is None:
            broker = Broker(work / "broker")
            host, port = "127.0.0.1", broker.port
        if args.fleet is None:
            fleet_dir = work / "fleet"
            edgert("fleet", "init", str(fleet_dir), "--id", "sim", "--broker-host", host, "--broker-port",
                   str(port))
        else:
            fleet_dir = args.fleet
        from edgert.fleet.fleetdir import FleetDir

        fd = FleetDir.open(fleet_dir)
        if not args.broker and args.fleet is not None:
            host, port = fd.broker.host, fd.broker.port
        listed = json.loads(edgert("fleet", "model", "list", "--fleet", str(fleet_dir), "--json"))
        published = {t.get("target") for t in listed}
        if f"models/{args.model}/{args.version}.edgepkg" not in published:
            edgert("fleet", "model", "add", str(args.model_file), "--fleet", str(fleet_dir), "--name",
                   args.model, "--version", args.version)
        spec = DeviceSpec(str(fleet_dir), fd.id, host, port, args.group, args.model, args.base_version,
                          str(args.base_model),
                          broken_model=str(args.broken_model) if args.broken_model else None)
        ids = [f"sim-{i:05d}" for i in range(args.devices)]
        n_bad = round(args.devices * args.fail_fraction)
        # Spread the faulty devices evenly over the fleet (and so over the waves and processes).
        faulty = [ids[int(i * args.devices / n_bad)] for i in range(n_bad)] if n_bad else []
        report["faulty"] = len(faulty)
        ctx = mp.get_context("spawn")
        out = ctx.Queue()
        t_setup = time.monotonic()
        for k in range(max(1, min(args.procs, args.devices))):
            mine = ids[k::args.procs]
            proc = ctx.Process(target=worker, args=(k, mine, [d for d in faulty if d in set(mine)], spec,
                                                    str(work / "devices"), out, stop), name=f"fleet-sim-{k}")
            proc.start()
            procs.append(proc)
        ready = 0
        while ready < len(procs):
            _next(out, procs, t_setup + args.setup_timeout)
            ready += 1
        report["setup_s"] = round(time.monotonic() - t_setup, 1)
        print(f"{args.devices} devices up in {len(procs)} processes after {report['setup_s']} s",
              file=sys.stderr)
        if args.no_rollout:
            print("devices running; Ctrl-C stops them", file=sys.stderr)
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
            return 0
        report.update(run_rollout(args, fleet_dir, fd.id, host, port, broker, procs, work))
        controller = report.pop("_controller", None)
        stop.set()
        results: list[dict[str, Any]] = []
        loads = 0
        for _ in procs:
            _, _, value = _next(out, procs, time.monotonic() + STOP_TIMEOUT_S)
            results += value["devices"]
            loads += value["shared_loads"]
        report["outcomes"] = _outcomes(results, args.version)
        report["shared_model_loads"] = loads
        print(json.dumps(report, indent=2))
        if args.report:
            args.report.write_text(json.dumps(report, indent=2) + "\n")
        state = report.get("rollout_state")
        return 0 if state == ("halted" if faulty and args.fail_fraction > 0 else "complete") else 1
    finally:
        stop.set()
        if controller is not None and controller.poll() is None:
            controller.send_signal(signal.SIGINT)
            try:
                controller.wait(20)
            except subprocess.TimeoutExpired:
                controller.kill()
        for proc in procs:
            proc.join(STOP_TIMEOUT_S)
            if proc.is_alive():
                proc.kill()
        if broker is not None:
            broker.stop()
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)


def run_rollout(args: argparse.Namespace, fleet_dir: Path, fleet_id: str, host: str, port: int,
                broker: Broker | None, procs: list[Any], work: Path) -> dict[str, Any]:
    """Start the controller, wait until it sees every device, deploy, and measure until the end."""
    from edgert.fleet.db import open_db

    log = open(work / "controller.log", "ab")
    controller = subprocess.Popen([sys.executable, "-m", "edgert.cli.main", "fleet", "serve", "--fleet",
                                   str(fleet_dir)], stdout=subprocess.DEVNULL, stderr=log,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})
    log.close()
    out: dict[str, Any] = {"_controller": controller}
    sys_counters = SysCounters(host, port)
    db = open_db(str(fleet_dir / "fleet.sqlite"))
    try:
        deadline = time.monotonic() + SEEN_TIMEOUT_S
        while True:
            seen = sum(1 for s in db.device_status(fleet_id).values() if s.get("online"))
            if seen >= args.devices:
                break
            if controller.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the controller saw {seen} of {args.devices} devices online; see "
                                 f"{work / 'controller.log'}")
            time.sleep(POLL_S)
        time.sleep(1.0)  # let the controller drain the status burst before the measurement starts
        pids = {"controller": [controller.pid], "broker": [broker.proc.pid] if broker else [],
                "simulator": [p.pid for p in procs]}
        cpu0 = {k: _cpu(v) for k, v in pids.items()}
        sys0 = sys_counters.fresh()
        t0 = time.time()
        deploy = ["fleet", "deploy", "--fleet", str(fleet_dir), "--group", args.group, "--model", args.model,
                  "--version", args.version, "--waves", args.waves, "--wait-healthy", args.wait_healthy,
                  "--max-failure-rate", args.max_failure_rate, "--json"]
        if args.min_attempts is not None:
            deploy += ["--min-attempts", str(args.min_attempts)]
        rollout = json.loads(edgert(*deploy))
        rid = rollout["rollout"]
        deadline = time.monotonic() + args.rollout_timeout
        peak_rss = {k: 0.0 for k in pids}
        while True:
            r = db.rollout(rid)
            for k, v in pids.items():
                peak_rss[k] = max(peak_rss[k], _rss_mb(v))
            if r is not None and r.state in ("complete", "halted", "rolled-back"):
                break
            if controller.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"rollout {rid} did not end (state {r.state if r else None}); see "
                                 f"{work / 'controller.log'}")
            time.sleep(POLL_S)
        t_end = time.time()
        cpu1 = {k: _cpu(v) for k, v in pids.items()}
        sys1 = sys_counters.fresh()
        waves = [{"ts": float(ts), "body": json.loads(body)} for ts, body in db.query(
            "SELECT ts, body FROM events WHERE rollout = ? AND kind = 'wave' ORDER BY id", (rid,))]
        ends = [e["ts"] for e in waves[1:]] + [t_end]
        out.update({
            "rollout": rid, "rollout_state": r.state, "reason": r.reason,
            "total_s": round(t_end - t0, 2),
            "waves": [{"wave": e["body"].get("wave"), "devices": e["body"].get("devices"),
                       "started_s": round(e["ts"] - t0, 2), "took_s": round(end - e["ts"], 2)}
                      for e, end in zip(waves, ends, strict=True)],
            "cpu_s": {k: round(cpu1[k] - cpu0[k], 2) for k in pids},
            "peak_rss_mb": peak_rss,
            "broker_sys": {k: sys1.get(k, 0) - sys0.get(k, 0) for k in SYS_TOPICS if k != "clients/connected"}
            if sys0 and sys1 else None,
            "broker_clients": sys1.get("clients/connected") if sys1 else None,
            "t0": t0,
        })
        return out
    finally:
        db.close()
        sys_counters.close()


def _next(out: Any, procs: list[Any], deadline: float) -> tuple[str, int, Any]:
    """The next message from a worker; SystemExit when one failed or died, or at the deadline."""
    import queue

    while True:
        try:
            kind, k, value = out.get(timeout=1.0)
        except queue.Empty:
            dead = [p.name for p in procs if not p.is_alive() and p.exitcode not in (0, None)]
            if dead or time.monotonic() > deadline:
                raise SystemExit(f"simulator process(es) {dead or 'timed out'}; see worker logs") from None
            continue
        if kind == "error":
            raise SystemExit(f"worker {k} failed: {value}")
        return kind, k, value


def _outcomes(results: list[dict[str, Any]], version: str) -> dict[str, Any]:
    finals: dict[str, int] = {}
    for r in results:
        finals[str(r["final"])] = finals.get(str(r["final"]), 0) + 1
    return {
        "final_states": finals,
        "serving_new": sum(1 for r in results if r["served"] == version and r["active"] == version),
        "faulty_serving_new": sum(1 for r in results if r["faulty"] and r["served"] == version),
        "store_and_served_disagree": sum(1 for r in results if r["served"] != r["active"]),
        "connected": sum(1 for r in results if r["connected"]),
    }


if __name__ == "__main__":
    sys.exit(main())
