"""``edgert package keygen|create|inspect``: signed, encrypted .edgepkg packages (fleet side)."""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import click

from edgert.errors import ConfigError, EdgertError, ModelError
from edgert.security.atomic import TMP_SUFFIX


def _read_recipients(values: tuple[str, ...], recipients_file: Path | None) -> list[str]:
    texts: list[str] = []
    for value in values:
        path = Path(value)
        texts.append(path.read_text() if not value.startswith("x25519:") and path.is_file() else value)
    if recipients_file is not None:
        try:
            lines = recipients_file.read_text().splitlines()
        except OSError as exc:
            raise ConfigError(f"cannot read recipients file {recipients_file}: {exc.strerror}") from exc
        texts += [ln.split("#", 1)[0].strip() for ln in lines if ln.split("#", 1)[0].strip()]
    return texts


def _describe_source(path: Path) -> tuple[str, str, list[dict[str, Any]], list[dict[str, Any]]]:
    """Format, variant (detected from the model itself), inputs and outputs of a plaintext model file."""
    from edgert.backends.describe import describe_file

    return describe_file(path)


def _split_model_arg(arg: str) -> tuple[Path, str | None]:
    """``PATH`` or ``PATH:VARIANT`` (a path that exists as given wins over the split)."""
    path, sep, variant = arg.rpartition(":")
    if not sep or Path(arg).exists():
        return Path(arg), None
    return Path(path), variant


def _sources(models: tuple[str, ...]) -> list[Any]:
    """Variant sources for MODEL arguments; clashing guessed variants get the format as a suffix."""
    from edgert.security.package import VariantSource

    out: list[VariantSource] = []
    for arg in models:
        path, variant = _split_model_arg(arg)
        if not path.is_file():
            raise ModelError(f"model file {path} does not exist", hint="give PATH or PATH:VARIANT")
        fmt, guessed, inputs, outputs = _describe_source(path)
        if variant is None:
            variant = guessed
            if any(s.variant == variant for s in out):
                variant = f"{guessed}-{fmt}"
        out.append(VariantSource(path, variant, fmt, inputs, outputs))
    return out


@click.group()
def package() -> None:
    """Create, sign and inspect encrypted model packages (.edgepkg)."""


@package.command("keygen")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Where to write the publisher's private key (0600 PKCS#8 PEM; never overwritten).")
def keygen_cmd(output: Path) -> None:
    """Create a publisher signing key; print its public key for devices to trust."""
    from edgert.security.package import format_key
    from edgert.security.trust import generate_publisher_key, publisher_fingerprint

    public = generate_publisher_key(output)
    click.echo(format_key(public))
    click.echo(f"fingerprint {publisher_fingerprint(public)}; keep {output} secret. On each device: "
               f"edgert keys trust {format_key(public)}", err=True)


@package.command("create")
@click.argument("models", nargs=-1, required=True, metavar="MODEL[:VARIANT]...")
@click.option("--name", required=True, help="Model name on the device.")
@click.option("--version", "version", required=True, help="Dotted integers, e.g. 3 or 1.2.0.")
@click.option("--publisher-key", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="The publisher's Ed25519 signing key ('edgert package keygen').")
@click.option("--recipient", "recipients", multiple=True, metavar="PUBKEY",
              help="Device X25519 key (x25519:... or a file holding it); repeatable.")
@click.option("--recipients-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="File with one x25519:... key per line (# comments allowed).")
@click.option("--min-edgert", default="0.1.0", show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Output path (default: NAME-VERSION.edgepkg).")
@click.option("--reference", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Reference data (.npz, one array per input): its profile is signed into the package "
                   "for drift detection on devices (docs/drift.md).")
def create_cmd(models: tuple[str, ...], name: str, version: str, publisher_key: Path,
               recipients: tuple[str, ...], recipients_file: Path | None, min_edgert: str,
               output: Path | None, reference: Path | None) -> None:
    """Encrypt one or more variants of a model (MODEL or MODEL:VARIANT, e.g. m.tflite:edgetpu) and sign it.

    VARIANT is int8, fp16, fp32 or edgetpu, optionally with a suffix (int8-tflite); without it the
    variant is guessed from the file name.
    """
    from edgert.security.keys import parse_public_key
    from edgert.security.package import create_package
    from edgert.security.trust import load_publisher_key

    signer = load_publisher_key(publisher_key)
    keys = [parse_public_key(t) for t in _read_recipients(recipients, recipients_file)]
    sources = _sources(models)
    profile = reference_profile(sources[0].path, reference) if reference is not None else None
    output = output or Path(f"{name}-{version}.edgepkg")
    tmp = output.with_name(output.name + TMP_SUFFIX)
    try:
        with open(tmp, "w+b") as out:
            manifest = create_package(sources, out, name=name, version=version, recipients=keys,
                                      signer=signer, now=datetime.now(timezone.utc), min_edgert=min_edgert,
                                      reference=profile)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, output)
    finally:
        if tmp.exists():
            tmp.unlink()
    described = ", ".join(f"{v.variant} ({v.format})" for v in manifest.variants)
    click.echo(f"wrote {output}: {manifest.name} {manifest.version}, variants {described}, for "
               f"{len(keys)} recipient(s); signed; manifest sha256 {manifest.digest}")
    if profile is not None:
        click.echo(f"reference profile of {profile['samples']} samples (from {reference}, run on "
                   f"{sources[0].path.name}) signed with the manifest")


def reference_profile(model: Path, data: Path) -> dict[str, Any]:
    """The reference profile document of ``model`` run on ``data`` (.npz), for the manifest."""
    from edgert.drift.reference import profile_model_file

    return profile_model_file(model, data)


def reference_summary(doc: Any) -> dict[str, Any] | None:
    """A short view of a manifest's reference profile (None without one; an error text if unreadable)."""
    if doc is None:
        return None
    from edgert.drift.profile import ReferenceProfile

    try:
        return ReferenceProfile.from_dict(doc).summary()
    except ModelError as exc:
        return {"error": exc.message}


def echo_reference(summary: dict[str, Any] | None) -> None:
    """Print a reference profile summary (``package inspect``, ``models inspect``)."""
    if summary is None:
        click.echo("reference profile: none (drift detection off; add one with --reference DATA.npz)")
        return
    if "error" in summary:
        click.echo(f"reference profile: unreadable ({summary['error']})")
        return
    click.echo(f"reference profile: {summary['samples']} samples")
    for group in ("inputs", "outputs"):
        for name, p in summary[group].items():
            if p["kind"] == "classes":
                dist = " ".join(f"{x:.3f}" for x in p["distribution"])
                click.echo(f"  {group[:-1]} {name}: {p['classes']} classes, mean confidence "
                           f"{p['mean_confidence']:.3f}, class mix {dist}")
            else:
                click.echo(f"  {group[:-1]} {name}: {p['features']} {p['layout']}s x {p['bins']} bins, "
                           f"mean {p['mean']:.4g}, std {p['std']:.4g}, "
                           f"edges {p['min_edge']:.4g}..{p['max_edge']:.4g}")


def inspect_package(path: Path, trusted_keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """What ``package inspect`` shows: manifest, signer and whether it verifies, recipients, variants."""
    from edgert.security.package import read_header
    from edgert.security.trust import TrustedPublishers

    with open(path, "rb") as f:
        header = read_header(f, str(path))
    m = header.manifest
    signature: dict[str, Any] = {"signer": header.signer_fingerprint, "present": header.signature is not None}
    try:
        header.verify_signature()
        signature["verifies"] = True
    except EdgertError as exc:
        signature["verifies"], signature["error"] = False, exc.message
    if trusted_keys:
        trusted = TrustedPublishers.from_keys(trusted_keys)
        signature["trusted"] = bool(signature["verifies"]) and header.signer_fingerprint in trusted
    return {
        "manifest": m.raw,
        "manifest_sha256": m.digest,
        "signature": signature,
        "recipients": [{"recipient": r.get("recipient"), "suite": r.get("suite")} for r in header.recipients],
        "variants": [{"variant": v.variant, "format": v.format, "plaintext_size": v.plaintext_size,
                      "plaintext_sha256": v.plaintext_sha256, "inputs": v.inputs, "outputs": v.outputs}
                     for v in m.variants],
        "reference": reference_summary(m.reference),
    }


@package.command("inspect")
@click.argument("pkg", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--trust", "trust_keys", multiple=True, metavar="ed25519:...",
              help="Also say whether the signer is this publisher key; repeatable.")
def inspect_cmd(pkg: Path, as_json: bool, trust_keys: tuple[str, ...]) -> None:
    """Show the manifest, signer, signature check, recipients and variants, without decrypting."""
    doc = inspect_package(pkg, trust_keys)
    if as_json:
        click.echo(json.dumps(doc, indent=2, sort_keys=True))
        return
    m, sig = doc["manifest"], doc["signature"]
    click.echo(f"{pkg}: {m['name']} {m['version']} (created {m['created']}, "
               f"needs edgert >= {m['min_edgert']})")
    verdict = "verifies" if sig["verifies"] else f"DOES NOT VERIFY: {sig.get('error')}"
    if "trusted" in sig:
        verdict += "; signer is trusted" if sig["trusted"] else "; signer is NOT among the given keys"
    click.echo(f"signer: {sig['signer'] or '(unsigned)'}; signature {verdict}")
    click.echo(f"manifest sha256: {doc['manifest_sha256']}")
    for v in doc["variants"]:
        ins = ", ".join(f"{i['name']}:{i['dtype']}{i['shape']}" for i in v["inputs"])
        click.echo(f"variant {v['variant']}: {v['format']}, {v['plaintext_size']} bytes, inputs {ins}")
    for r in doc["recipients"]:
        click.echo(f"recipient {r['recipient']} ({r['suite']})")
    echo_reference(doc["reference"])
