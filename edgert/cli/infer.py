"""``edgert infer MODEL``: run one inference from .npy/.npz inputs or random data."""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from edgert.cli.common import echo_json, profile_option


@click.command()
@click.argument("model_path", metavar="MODEL", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--input",
    "-i",
    "inputs",
    multiple=True,
    metavar="[NAME=]FILE",
    help="Input tensor from a .npy (NAME= for multi-input models) or all inputs from a .npz.",
)
@click.option("--random", "use_random", is_flag=True, help="Use seeded random inputs of the model's shape.")
@click.option("--batch", default=1, show_default=True, type=click.IntRange(min=1), help="Batch for --random.")
@click.option("--shape", "shapes", multiple=True, metavar="NAME=D1,D2,…", help="Shape for dynamic dims.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed for --random.")
@click.option(
    "--output",
    "-o",
    "output_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Save all outputs to this .npz file.",
)
@click.option("--nan-policy", type=click.Choice(["allow", "reject"]), default="allow", show_default=True)
@profile_option
@click.option("--json", "as_json", is_flag=True, help="Print outputs as JSON.")
def infer(
    model_path: Path,
    inputs: tuple[str, ...],
    use_random: bool,
    batch: int,
    shapes: tuple[str, ...],
    seed: int,
    output_path: Path | None,
    nan_policy: str,
    profile: str,
    as_json: bool,
) -> None:
    """Run MODEL once and print its outputs (shape, dtype, values; top classes for logits)."""
    from edgert.cli.tensors import load_inputs, parse_shapes, random_inputs
    from edgert.errors import InputError
    from edgert.runtime import ModelOptions, Runtime

    if bool(inputs) == use_random:
        raise InputError("give either --input FILE or --random", hint="see 'edgert infer --help'")
    model = Runtime(profile).load(model_path, options=ModelOptions(nan_policy=nan_policy))
    feed = (
        random_inputs(model.inputs, batch, parse_shapes(shapes), seed)
        if use_random
        else load_inputs(inputs, model.inputs)
    )
    outputs = model.infer(feed)
    if output_path:
        np.savez(output_path, **outputs)  # type: ignore[arg-type]
    if as_json:
        echo_json(
            {
                "model": model.name,
                "provider": model.provider,
                "outputs": {
                    k: {"shape": list(v.shape), "dtype": v.dtype.name, "data": v.tolist()}
                    for k, v in outputs.items()
                },
            }
        )
        return
    click.echo(f"model {model.name} ({model.format}) on {model.provider}")
    for name, value in outputs.items():
        click.echo(f"{name}: {value.dtype.name}{list(value.shape)}")
        if value.ndim == 2 and value.shape[1] > 1 and value.dtype.kind == "f":
            for row, top in enumerate(np.argsort(-value, axis=1)[:, :3][:8]):
                click.echo(f"  [{row}] top classes: " + ", ".join(f"{c} ({value[row, c]:.3f})" for c in top))
        else:
            with np.printoptions(precision=4, threshold=20, edgeitems=3):
                click.echo(f"  {value}")
    if output_path:
        click.echo(f"saved outputs to {output_path}")
