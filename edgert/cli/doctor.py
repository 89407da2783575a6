"""``edgert doctor``: what this machine has, which profile fits, and why."""

from __future__ import annotations

import platform
import sys
from importlib import metadata

import click

from edgert.cli.common import echo_json

_PACKAGES = (
    "onnxruntime",
    "onnxruntime-gpu",
    "onnxruntime-openvino",
    "onnxruntime-qnn",
    "numpy",
    "ai-edge-litert",
    "tflite-runtime",
    "paho-mqtt",
    "cryptography",
    "tuf",
    "pyserial",
    "httptools",
)


def _versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in _PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def collect() -> dict:
    """Everything doctor reports, as a JSON-able dict."""
    from edgert import __version__
    from edgert.backends import litert, onnx
    from edgert.detect import HostFileSystem, rank_profiles
    from edgert.profiles import scan_profiles

    providers = onnx.available_providers()
    found, problems = scan_profiles()
    ranked = rank_profiles(found.values(), HostFileSystem(), providers)
    chosen = next((m for m in ranked if m.matched), None)
    lite_mod, lite_errors = litert.interpreter_module()
    return {
        "edgert": __version__,
        "python": sys.version.split()[0],
        "platform": f"{platform.system()} {platform.machine()}",
        "packages": _versions(),
        "backends": {
            "onnxruntime": {
                "ok": onnx.import_error() is None,
                "error": onnx.import_error(),
                "providers": providers,
            },
            "litert": {
                "ok": lite_mod is not None,
                "module": getattr(lite_mod, "__name__", None),
                "errors": lite_errors if lite_mod is None else [],
            },
        },
        "profile": chosen.profile.name if chosen else None,
        "profiles": [
            {
                "name": m.profile.name,
                "matched": m.matched,
                "priority": m.profile.detect.priority,
                "reasons": list(m.reasons),
            }
            for m in ranked
        ],
        # Files that could not be used; the profiles above come from every other file.
        "profile_errors": [{"path": p.path, "error": p.error} for p in problems],
    }


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def doctor(as_json: bool) -> None:
    """Check Python, packages, backends and providers, and detect the device profile."""
    info = collect()
    if as_json:
        echo_json(info)
        return
    click.echo(f"edgert {info['edgert']}  python {info['python']}  {info['platform']}")
    click.echo("packages:")
    for name, version in info["packages"].items():
        if version:
            click.echo(f"  {name:<22} {version}")
    ort = info["backends"]["onnxruntime"]
    lite = info["backends"]["litert"]
    click.echo("backends:")
    if ort["ok"]:
        click.echo(f"  onnxruntime  ok    providers: {', '.join(ort['providers'])}")
    else:
        click.echo(f"  onnxruntime  MISSING  {ort['error']}")
    if lite["ok"]:
        click.echo(
            f"  litert       ok    module: {lite['module']} (delegates per profile; CPU/XNNPACK built in)"
        )
    else:
        click.echo(
            "  litert       MISSING  " + "; ".join(lite["errors"]) + "  (pip install 'edgert[litert]')"
        )
    click.echo(f"detected profile: {info['profile']}")
    for p in info["profiles"]:
        mark = "*" if p["name"] == info["profile"] else ("+" if p["matched"] else "-")
        click.echo(f"  {mark} {p['name']:<16} " + "; ".join(p["reasons"]))
    click.echo("(* chosen, + matches, - does not match)")
    if info["profile_errors"]:
        click.echo("profile files skipped (fix or remove them; see device_profiles/README.md):")
        for e in info["profile_errors"]:
            for line in e["error"].splitlines():
                if line.strip():
                    click.echo(f"  ! {line.strip()}")
