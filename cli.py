"""featcache command line: options -> one frozen config -> pipeline call. No logic lives here."""
from __future__ import annotations

import click

from pipeline.cliutil import Group, emit, float_list, int_list, progress_enabled
from pipeline.config import ExtractConfig, HeadConfig


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def main() -> None:
    """Run a frozen CNN once, cache its features in HDF5, train many heads in seconds."""


@main.command()
@click.argument("image_dir", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(), help="Cache file to create or update (.h5).")
@click.option("--backbone", default="resnet18", show_default=True, help="torchvision model name or efficientnet_lite0.")
@click.option("--weights", default="DEFAULT", show_default=True, help="DEFAULT, a weights enum name, none, or a state_dict PATH.")
@click.option("--layer", default=None, help="Graph node to read (default: the classifier's input).")
@click.option("--pool", type=click.Choice(["avg", "max", "flatten"]), default=None, help="Reduce spatial maps.")
@click.option("--batch-size", default=64, show_default=True, type=int)
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@click.option("--workers", default=None, type=int, help="Decoding processes (default: one per spare core).")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True)
@click.option("--seed", default=0, show_default=True, type=int, help="Seed for --weights none.")
@click.option("--overwrite", is_flag=True, help="Replace a cache built with a different configuration.")
@click.option("--verify-content", is_flag=True, help="Detect changed images by sha256, not size+mtime.")
@click.option("--max-skipped", default=0.5, show_default=True, type=float, help="Fail above this unusable fraction.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON summary on stdout.")
def extract(image_dir, output, as_json, **opts) -> None:
    """Run the frozen backbone over IMAGE_DIR once and store features in an HDF5 cache."""
    from pipeline.extract import run_extract

    s = run_extract(ExtractConfig(image_dir=image_dir, output=output, **opts), progress=progress_enabled(as_json))
    emit(s, as_json, [
        f"{s['cache']}: {s['n_images']} images x {s['feature_dim']} features ({s['backbone']}, {s['weights']})",
        f"extracted {s['extracted']}, reused {s['reused']}, removed {s['removed']}, skipped {s['skipped']} "
        f"in {s['seconds']:.1f}s" + (f" ({s['images_per_second']} img/s)" if s["images_per_second"] else ""),
        *(f"  skipped {p}: {r}" for p, r in s["skipped_files"]),
    ])


@main.command()
@click.argument("cache", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def info(cache, as_json) -> None:
    """Show a cache's shape, classes, splits and recorded attributes."""
    from pipeline.info import cache_info, info_lines

    data = cache_info(cache)
    emit(data, as_json, info_lines(data))


@main.command("fit-head")
@click.argument("cache", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(), help="Run folder for head.pt and metrics.json.")
@click.option("--head", type=click.Choice(["linear", "mlp"]), default="linear", show_default=True)
@click.option("--hidden", multiple=True, default=["512"], show_default=True,
              help="Hidden sizes of one MLP, e.g. 512,256; repeat to sweep; a list with 0 sweeps widths (0 = linear).")
@click.option("--dropout", default="0.5", show_default=True, help="Dropout after hidden layers (comma list sweeps).")
@click.option("--weight-decay", default="1e-4", show_default=True, help="L2 on weights, not biases/norms.")
@click.option("--l1", default="0", show_default=True, help="L1 penalty on weights.")
@click.option("--batchnorm", is_flag=True, help="Batch norm after each hidden layer.")
@click.option("--optimizer", default="adam", show_default=True, help="adam, adamw or sgd (comma list sweeps).")
@click.option("--lr", default="1e-3", show_default=True)
@click.option("--momentum", default="0.9", show_default=True, help="SGD momentum.")
@click.option("--epochs", default=100, show_default=True, type=int)
@click.option("--batch-size", default=256, show_default=True, type=int)
@click.option("--patience", default=10, show_default=True, type=int, help="Early-stopping patience; 0 disables.")
@click.option("--val-fraction", default=0.2, show_default=True, type=float, help="Hold-out when the cache has no val split.")
@click.option("--standardize/--no-standardize", default=True, show_default=True)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--device", default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON summary on stdout.")
def fit_head(cache, output, hidden, dropout, weight_decay, l1, optimizer, lr, momentum, as_json, **opts) -> None:
    """Train heads on cached features; keep the best by validation accuracy."""
    from pipeline.fit import run_fit_head
    from pipeline.report import fit_lines, parse_hidden

    cfg = HeadConfig(
        cache=cache, output=output, hidden=parse_hidden(hidden), dropout=float_list(dropout, "--dropout"),
        weight_decay=float_list(weight_decay, "--weight-decay"), l1=float_list(l1, "--l1"),
        optimizer=tuple(o.strip() for o in optimizer.split(",") if o.strip()), lr=float_list(lr, "--lr"),
        momentum=float_list(momentum, "--momentum"), **opts)
    s = run_fit_head(cfg, progress=progress_enabled(as_json))
    emit({k: v for k, v in s.items() if k != "leaderboard" or len(v) > 1}, as_json, fit_lines(s))


if __name__ == "__main__":
    main()
