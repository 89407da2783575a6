"""``edgert capture keygen|enable|disable|status|open``: sealed data capture to a fleet key."""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np

from edgert import paths
from edgert.cli.keys import resolve_root, state_dir_option


@click.group()
def capture() -> None:
    """Sealed capture of sampled inputs/outputs, readable only with the fleet key."""


@capture.command("keygen")
@click.argument("private_key_path", type=click.Path(dir_okay=False, path_type=Path))
def keygen_cmd(private_key_path: Path) -> None:
    """Create the fleet capture key pair (run on the fleet side; keep the private key there)."""
    from edgert.security.capture import generate_fleet_key

    click.echo(generate_fleet_key(private_key_path))


@capture.command("enable")
@click.argument("model")
@click.option("--rate", type=float, required=True, help="Fraction of requests to capture (0..1).")
@click.option("--max-mb", type=float, required=True, help="Size cap for this model's captures.")
@click.option("--fleet-key", required=True, metavar="x25519:...", help="Fleet capture public key.")
@state_dir_option
def enable_cmd(model: str, rate: float, max_mb: float, fleet_key: str, state_dir: Path | None) -> None:
    """Enable capture for MODEL."""
    from edgert.security.capture import CaptureSettings, load_capture_config, save_capture_config
    from edgert.security.loader import open_audit, open_keystore

    root = resolve_root(state_dir)
    cdir = paths.capture_dir(root)
    config = load_capture_config(cdir)
    config[model] = CaptureSettings(rate, int(max_mb * 1024 * 1024), fleet_key).validate(model)
    save_capture_config(cdir, config)
    with open_audit(root, open_keystore(root)) as audit:
        audit.append("config_change", what="capture", model=model, rate=rate,
                     max_bytes=config[model].max_bytes)
    click.echo(f"capture enabled for {model}: rate {rate}, cap {max_mb} MB")


@capture.command("disable")
@click.argument("model")
@state_dir_option
def disable_cmd(model: str, state_dir: Path | None) -> None:
    """Disable capture for MODEL."""
    from edgert.security.capture import load_capture_config, save_capture_config
    from edgert.security.loader import open_audit, open_keystore

    root = resolve_root(state_dir)
    config = load_capture_config(paths.capture_dir(root))
    config.pop(model, None)
    save_capture_config(paths.capture_dir(root), config)
    with open_audit(root, open_keystore(root)) as audit:
        audit.append("config_change", what="capture", model=model, rate=0)
    click.echo(f"capture disabled for {model}")


@capture.command("status")
@state_dir_option
def status_cmd(state_dir: Path | None) -> None:
    """Show capture settings and bytes used per model."""
    from edgert.security.capture import load_capture_config

    cdir = paths.capture_dir(resolve_root(state_dir))
    for model, s in load_capture_config(cdir).items():
        used = sum(p.stat().st_size for p in (cdir / model).glob("*.sealed"))
        click.echo(f"{model}: rate {s.rate}, used {used} of {s.max_bytes} bytes")


@capture.command("open")
@click.argument("files", nargs=-1, required=True,
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--key", "key_path", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Fleet capture private key (from 'edgert capture keygen').")
@click.option("--model", default=None, help="Model name (default: the file's directory name).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write each record as an .npz here; otherwise print a summary.")
def open_cmd(files: tuple[Path, ...], key_path: Path, model: str | None, out_dir: Path | None) -> None:
    """Decrypt capture FILES with the fleet private key."""
    from cryptography.hazmat.primitives.asymmetric import x25519

    from edgert.errors import KeyFileError
    from edgert.security.capture import open_capture
    from edgert.security.keys import load_private_key_file

    key = load_private_key_file(key_path)
    if not isinstance(key, x25519.X25519PrivateKey):
        raise KeyFileError(f"{key_path} is not an X25519 private key",
                           hint="use the key from 'capture keygen'")
    n = 0
    for path in files:
        for record in open_capture(path, key, model):
            if out_dir is not None:
                out_dir.mkdir(parents=True, exist_ok=True)
                arrays = {f"in_{k}": v for k, v in record.inputs.items()}
                arrays.update({f"out_{k}": v for k, v in record.outputs.items()})
                np.savez(out_dir / f"record-{n:06d}.npz", **arrays)  # type: ignore[arg-type]
            else:
                shapes = {k: list(v.shape) for k, v in {**record.inputs, **record.outputs}.items()}
                click.echo(json.dumps({"meta": record.meta, "shapes": shapes}))
            n += 1
    click.echo(f"{n} records", err=True)
