"""The device-side provisioning agent: the operations a technician runs over the cable.

``info``, ``keys``, ``configure``, ``enroll``, ``selftest``, ``install_begin`` / DATA /
``install_commit`` and ``finish``, each audited. After ``finish`` the device is locked: only
``info`` answers, and :func:`factory_reset` (local, audited) is the way back. State lives in
``<state>/provision/`` (0700): ``state.json`` (steps done, lock), ``claim.json`` (0600, deleted once
the device holds its own certificate), ``incoming/`` (partial transfers, resumable).
:func:`serve` runs the agent on a port until the device is provisioned.
"""

from __future__ import annotations

import base64
import contextlib
import json
import platform
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgert import __version__, paths
from edgert.errors import EdgertError
from edgert.provision.enroll_client import broker_check, enroll_with_claim
from edgert.provision.install import InstallSteps
from edgert.provision.session import DeviceRefusal, DeviceSession, ErrorCode, read_available
from edgert.security.atomic import FileSystem, ensure_private_dir

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

__all__ = ["DEFAULT_CONFIG_PATH", "LOCKED_MARKER", "SELFTEST_MODEL", "Agent", "factory_reset", "serve"]

DEFAULT_CONFIG_PATH = Path("/etc/edgert/edgert.toml")
SELFTEST_MODEL = "digits_small_int8.onnx"
SELFTEST_RUNS = 20
#: Exists once the device is provisioned (the agent's systemd unit then does not start).
LOCKED_MARKER = "locked"
STEPS = ("keys", "configure", "enroll", "selftest", "install", "finish")


def _toml(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (str, bool, list)) else repr(value)


class Agent(InstallSteps):
    """Operations on one device's state directory and config file (no port: see :func:`serve`)."""

    def __init__(
        self,
        state_dir: Path,
        config_path: Path = DEFAULT_CONFIG_PATH,
        *,
        fs: FileSystem | None = None,
        profile: str = "auto",
        clock: Callable[[], datetime] | None = None,
        fleet_key: Ed25519PublicKey | None = None,
    ) -> None:
        self.root, self.config_path, self.fs, self.profile = Path(state_dir), Path(config_path), fs, profile
        #: The fleet key pinned in the device image, if any: bundles must be signed by it.
        self.fleet_key = fleet_key
        self.clock = clock or (lambda: datetime.now(timezone.utc))
        self.dir = self.root / "provision"
        self._transfer: dict[str, Any] | None = None

    # -- state --------------------------------------------------------------------------------------
    def _fs(self) -> FileSystem:
        return self.fs or FileSystem()

    def state(self) -> dict[str, Any]:
        """``state.json`` (empty when nothing was done yet)."""
        try:
            doc = json.loads((self.dir / "state.json").read_text(encoding="utf-8"))
            return doc if isinstance(doc, dict) else {}
        except (OSError, ValueError):
            return {}

    def _save(self, **changes: Any) -> None:
        doc = {**self.state(), **changes}
        ensure_private_dir(self.dir)
        self._fs().atomic_write(self.dir / "state.json", [json.dumps(doc).encode()], mode=0o600, step="state")

    def _step_done(self, step: str, **extra: Any) -> None:
        self._save(steps={**self.state().get("steps", {}), step: True}, **extra)

    def _keys(self) -> Any:
        from edgert.security.loader import open_keystore

        if not paths.keys_dir(self.root).exists():
            raise DeviceRefusal(
                ErrorCode.OUT_OF_ORDER, "the device has no keys yet", hint="run the keys step"
            )
        return open_keystore(self.root)

    def _audit(self, event: str, **fields: Any) -> None:
        from edgert.security.loader import open_audit

        keys = self._keys() if paths.keys_dir(self.root).exists() else None
        with open_audit(self.root, keys) as audit:
            audit.append(f"provision_{event}", **fields)

    def _need(self, *steps: str) -> None:
        done = self.state().get("steps", {})
        for s in steps:
            if not done.get(s):
                raise DeviceRefusal(
                    ErrorCode.OUT_OF_ORDER,
                    f"the {s} step has not been done",
                    hint=f"run the steps in order: {', '.join(STEPS)}",
                )

    # -- dispatch -----------------------------------------------------------------------------------
    def handle(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        """Run one operation (the session's request handler)."""
        if op == "info":
            return self.info()
        if self.state().get("locked"):
            raise DeviceRefusal(
                ErrorCode.LOCKED,
                f"device {self.state().get('device_id')} is already provisioned",
                hint="re-provisioning needs a factory reset on the device: "
                "'edgert provision factory-reset --yes'",
            )
        ops: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
            "keys": self.op_keys,
            "configure": self.op_configure,
            "enroll": self.op_enroll,
            "selftest": self.op_selftest,
            "install_begin": self.op_install_begin,
            "install_commit": self.op_install_commit,
            "finish": self.op_finish,
        }
        if op not in ops:
            raise DeviceRefusal(
                ErrorCode.UNKNOWN_OP, f"no operation {op!r}", hint=f"operations: info, {', '.join(ops)}"
            )
        try:
            return ops[op](args)
        except (KeyError, TypeError, ValueError) as exc:
            raise DeviceRefusal(ErrorCode.BAD_ARGS, f"{op}: bad or missing argument {exc}") from None

    def info(self) -> dict[str, Any]:
        """Model, serial, profile, edgert version, provisioned or not, key fingerprints."""
        st = self.state()
        out: dict[str, Any] = {
            "model": _read_first("/proc/device-tree/model", "/sys/class/dmi/id/product_name")
            or platform.machine(),
            "serial": _read_first("/proc/device-tree/serial-number", "/sys/class/dmi/id/product_serial")
            or "",
            "hostname": platform.node(),
            "edgert": __version__,
            "provisioned": bool(st.get("locked")),
            "device_id": st.get("device_id"),
            "steps": st.get("steps", {}),
            "fingerprints": {},
            "fleet_key": self._pinned_fingerprint(),
        }
        with contextlib.suppress(Exception):
            from edgert.detect import detect
            from edgert.profiles import available_profiles

            out["profile"] = detect(available_profiles().values()).profile.name
        if paths.keys_dir(self.root).exists():
            summary = self._keys().public_summary()
            out["fingerprints"] = {k: v for k, v in summary.items() if k.endswith("fingerprint")}
        return out

    def _pinned_fingerprint(self) -> str | None:
        from edgert.security.trust import publisher_fingerprint

        return publisher_fingerprint(self.fleet_key) if self.fleet_key is not None else None

    def op_keys(self, args: dict[str, Any]) -> dict[str, Any]:
        """Create the device keys here (or reuse them); public keys plus a CSR for the TLS key."""
        from edgert.security.loader import open_keystore

        device_id = str(args["device_id"])
        from edgert.mqtt.topics import check_id

        check_id(device_id, "device id")
        created = not paths.keys_dir(self.root).exists()
        keys = open_keystore(self.root, create=True)
        summary = keys.public_summary()
        self._step_done("keys", device_id=device_id)
        self._audit("keys", device=device_id, created=created, fingerprint=keys.wrap_fingerprint)
        return {**summary, "csr": keys.tls_csr(device_id).decode("ascii"), "created": created}

    def op_configure(self, args: dict[str, Any]) -> dict[str, Any]:
        """Write the fleet's public material and the daemon config (validated, atomic)."""
        from edgert.config import parse_config
        from edgert.security.trust import parse_publisher_key, trust_publisher

        self._need("keys")
        b = args["bundle"]
        if "claim_broker" not in b:
            raise DeviceRefusal(
                ErrorCode.BAD_ARGS,
                "the bundle has no claim endpoint (bundle format 1)",
                hint="upgrade edgert on the technician's side and make a new bundle",
            )
        if self.fleet_key is not None:
            self._check_pinned(b, self.fleet_key)
        device_id = self.state()["device_id"]
        groups = [str(g) for g in args.get("groups") or b["groups"]]
        fleet_dir = ensure_private_dir(self.root / "fleet")
        fs = self._fs()
        broker = b["broker"]
        mqtt: dict[str, Any] = {
            "host": broker["host"],
            "port": int(broker["port"]),
            "protocol": str(broker.get("protocol", "5")),
            "fleet": b["fleet"],
            "device_id": device_id,
            "group": groups[0],
            "command_key_file": str(fleet_dir / "command.pub.pem"),
            "telemetry_interval": float(b.get("telemetry_interval", 60.0)),
        }
        ca_pem = b.get("broker_ca_pem")
        if broker.get("tls"):
            if not ca_pem:
                raise ValueError("broker_ca_pem (the device endpoint uses TLS)")
            mqtt["ca_file"] = str(fleet_dir / "ca.pem")
        claim = b["claim_broker"]
        claim_mqtt: dict[str, Any] = {
            "host": str(claim["host"]),
            "port": int(claim["port"]),
            "protocol": str(claim.get("protocol", "5")),
            "fleet": b["fleet"],
        }
        if claim.get("tls"):
            claim_mqtt["ca_file"] = str(fleet_dir / "ca.pem")
        text = self._config_text(mqtt)
        parse_config(text, str(self.config_path))  # refuse before anything is written
        publisher = parse_publisher_key(b["publisher"])
        if ca_pem:
            fs.atomic_write(fleet_dir / "ca.pem", [str(ca_pem).encode()], mode=0o600, step="ca")
        fs.atomic_write(
            fleet_dir / "command.pub.pem", [b["command_pem"].encode()], mode=0o600, step="command"
        )
        fs.atomic_write(fleet_dir / "capture.pub", [b["capture"].encode()], mode=0o600, step="capture")
        ensure_private_dir(self.root / "tuf")
        fs.atomic_write(
            self.root / "tuf" / "root.json", [base64.b64decode(b["tuf_root"])], mode=0o600, step="tuf-root"
        )
        trust_publisher(self.root, publisher)
        self._write_config(mqtt)
        self._step_done("configure", fleet=b["fleet"], groups=groups, mqtt=mqtt, claim_mqtt=claim_mqtt)
        self._audit(
            "configure",
            device=device_id,
            fleet=b["fleet"],
            groups=",".join(groups),
            config=str(self.config_path),
        )
        return {
            "config": str(self.config_path),
            "device_id": device_id,
            "fleet": b["fleet"],
            "groups": groups,
        }

    def _check_pinned(self, doc: dict[str, Any], key: Ed25519PublicKey) -> None:
        from edgert.errors import SignatureError
        from edgert.provision.bundle import verify_device_part

        try:
            verify_device_part(doc, key)
        except SignatureError as exc:
            self._audit("bundle_refused", reason="signature")
            raise DeviceRefusal(ErrorCode.SECURITY, exc.message, hint=exc.hint) from None

    def _config_text(self, mqtt: dict[str, Any]) -> str:
        lines = [
            "# written by 'edgert provision'; see packaging/edgert.toml for every key",
            "[daemon]",
            f"state_dir = {_toml(str(self.root))}",
            "",
            "[mqtt]",
        ]
        lines += [f"{k} = {_toml(v)}" for k, v in mqtt.items()]
        return "\n".join(lines) + "\n"

    def _write_config(self, mqtt: dict[str, Any]) -> None:
        from edgert.config import parse_config

        text = self._config_text(mqtt)
        parse_config(text, str(self.config_path))
        self.config_path.parent.mkdir(parents=True, exist_ok=True)
        self._fs().atomic_write(self.config_path, [text.encode()], mode=0o640, step="config")
        st = self.state()
        if Path(self.root / "edgert.toml") != self.config_path:
            self._fs().atomic_write(
                self.root / "edgert.toml", [text.encode()], mode=0o600, step="config-copy"
            )
        self._save(mqtt=mqtt, steps=st.get("steps", {}))

    def op_enroll(self, args: dict[str, Any]) -> dict[str, Any]:
        """Install the claim; with ``connect`` (default) enroll now and switch to the own certificate."""
        self._need("configure")
        claim = {"id": str(args["claim_id"]), "secret": str(args["claim_secret"])}
        ensure_private_dir(self.dir)
        self._fs().atomic_write(
            self.dir / "claim.json", [json.dumps(claim).encode()], mode=0o600, step="claim"
        )
        out: dict[str, Any] = {"claim_installed": True, "enrolled": False, "broker_reachable": False}
        self._audit("claim_installed", claim=claim["id"])
        if args.get("connect", True):
            out.update(self._enroll_now(claim, float(args.get("timeout", 15.0))))
        self._step_done("enroll", enrolled=out["enrolled"])
        return out

    def _enroll_now(self, claim: dict[str, str], timeout: float) -> dict[str, Any]:
        st, keys = self.state(), self._keys()
        mqtt = dict(st["mqtt"])
        try:
            cert = enroll_with_claim(
                st["claim_mqtt"],
                claim["id"],
                claim["secret"],
                device=st["device_id"],
                groups=st["groups"],
                csr=keys.tls_csr(st["device_id"]).decode(),
                x25519=keys.public_summary()["wrap_public_key"],
                timeout=timeout,
            )
        except EdgertError as exc:
            self._audit("enroll_failed", claim=claim["id"], reason=exc.message)
            return {
                "enrolled": False,
                "broker_reachable": "connect" not in exc.message,
                "error": exc.message,
                "hint": exc.hint,
            }
        tls = ensure_private_dir(self.root / "tls")
        self._fs().atomic_write(tls / "device.crt", [cert.encode()], mode=0o600, step="cert")
        if mqtt.get("ca_file"):  # TLS broker: the device's own certificate replaces the claim
            mqtt["cert_file"] = str(tls / "device.crt")
            mqtt["key_file"] = str(paths.keys_dir(self.root) / "tls-p256.pem")
            self._write_config(mqtt)
        self._fs().remove(self.dir / "claim.json", step="claim-removed")
        from cryptography import x509

        from edgert.security.keys import fingerprint

        fp = fingerprint(x509.load_pem_x509_certificate(cert.encode()).public_key())  # type: ignore[arg-type]
        self._audit("enrolled", claim=claim["id"], device=st["device_id"], cert_fingerprint=fp)
        return {"enrolled": True, "broker_reachable": True, "cert_fingerprint": fp}

    def op_selftest(self, args: dict[str, Any]) -> dict[str, Any]:
        """Load the bundled model, run it, time it; check the broker with the device's credential."""
        import numpy as np

        from edgert._resources import sample_model
        from edgert.runtime import Runtime

        model = Runtime(self.profile).load(sample_model(SELFTEST_MODEL))
        feeds = {s.name: np.zeros([d or 1 for d in s.shape], dtype=s.dtype) for s in model.inputs}
        model.infer(feeds)
        times = []
        for _ in range(SELFTEST_RUNS):
            t0 = time.perf_counter()
            model.infer(feeds)
            times.append(time.perf_counter() - t0)
        out: dict[str, Any] = {
            "model": SELFTEST_MODEL,
            "provider": model.provider,
            "latency_ms_p50": round(sorted(times)[len(times) // 2] * 1000, 3),
        }
        st = self.state()
        if st.get("mqtt") and args.get("broker", True):
            # Before enrollment the claim listener with the claim; after it, the device listener with
            # the device's own certificate (the claim is gone by then).
            claim = self._claim()
            where = st["claim_mqtt"] if claim else st["mqtt"]
            ok, detail = broker_check(where, claim, timeout=float(args.get("timeout", 10.0)))
            out.update(broker_reachable=ok, broker_detail=detail, credential="claim" if claim else "device")
        self._step_done("selftest")
        self._audit(
            "selftest",
            provider=model.provider,
            latency_ms_p50=out["latency_ms_p50"],
            broker_reachable=out.get("broker_reachable"),
        )
        return out

    def _claim(self) -> dict[str, str] | None:
        try:
            doc = json.loads((self.dir / "claim.json").read_text(encoding="utf-8"))
            return doc if isinstance(doc, dict) else None
        except (OSError, ValueError):
            return None

    def op_finish(self, args: dict[str, Any]) -> dict[str, Any]:
        """Lock provisioning; the agent stops. Re-provisioning needs :func:`factory_reset`."""
        self._need("keys", "configure")
        st = self.state()
        self._save(locked=True, locked_at=self.clock().strftime("%Y-%m-%dT%H:%M:%SZ"))
        # A file systemd can test (ConditionPathExists=! in packaging/edgert-provision@.service);
        # factory_reset removes it with the rest of provision/.
        self._fs().atomic_write(self.dir / LOCKED_MARKER, [b"provisioned\n"], mode=0o600, step="locked")
        self._audit("finish", device=st.get("device_id"), steps=",".join(sorted(st.get("steps", {}))))
        return {"device_id": st.get("device_id"), "locked": True, "enrolled": bool(st.get("enrolled"))}


def factory_reset(
    state_dir: Path, config_path: Path = DEFAULT_CONFIG_PATH, *, wipe_keys: bool = False
) -> None:
    """Unlock provisioning and remove what it wrote (config, claim, fleet material); audited."""
    import shutil

    agent = Agent(state_dir, config_path)
    agent._audit("factory_reset", device=agent.state().get("device_id"), wipe_keys=wipe_keys)
    for p in (config_path, Path(state_dir) / "edgert.toml", Path(state_dir) / "tuf" / "root.json"):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    for d in ("provision", "fleet", "tls") + (("keys",) if wipe_keys else ()):
        shutil.rmtree(Path(state_dir) / d, ignore_errors=True)


def _read_first(*candidates: str) -> str | None:
    for c in candidates:
        with contextlib.suppress(OSError):
            return Path(c).read_text(errors="replace").strip("\x00\n ")
    return None


def serve(port: Any, agent: Agent, *, should_stop: Callable[[], bool] = lambda: False) -> None:
    """Answer the technician on ``port`` until the device is locked (``finish``) or ``should_stop``."""
    session = DeviceSession(agent.handle, agent.data, hello_info={"agent": f"edgert {__version__}"})
    port.timeout = 0.1
    while not should_stop():
        data = read_available(port)
        if data:
            out = session.receive(data)
            if out:
                port.write(out)
                port.flush()
        if agent.state().get("locked") and not data:
            return
