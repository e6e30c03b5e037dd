"""featcache command line: options -> one frozen config -> pipeline call -> printed summary.

No logic lives here. This is the only module that imports click; every error the library raises
(``FeatcacheError``) becomes one line on stderr and a non-zero exit code.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import warnings

import click

from featcache import __version__
from featcache.pipeline import startup
from featcache.pipeline.config import FT_AUGMENT, SELECT_BY, ExtractConfig, FinetuneConfig, HeadConfig
from featcache.pipeline.errors import FeatcacheError
from featcache.pipeline.heads import kinds
from featcache.pipeline.options import float_list, int_list, str_list
from featcache.pipeline.signals import interrupt_status, sigterm_as_interrupt

# What an interrupted command adds to "interrupted": extract keeps every finished batch in its journal.
RESUME_HINT = {"extract": "re-run the same command to resume"}


def fail(message: str, code: int = 1) -> None:
    """Print one line on stderr and exit non-zero."""
    first = " ".join(str(message).split()) or "error"
    click.echo(f"featcache: error: {first}", err=True)
    sys.exit(code)


class Group(click.Group):
    """A click group whose every error is one line on stderr (no usage dump, no traceback).

    Set FEATCACHE_DEBUG=1 to see the traceback of an unexpected error. SIGTERM is handled like
    Ctrl-C (pipeline/signals.py): one line, exit 143 (130 for Ctrl-C), every cleanup run.
    """

    subcommand: str | None = None  # the command being run, for the interruption line

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as e:  # caught before click, which would print an empty line first
            raise _Interrupted(interrupt_status(e)) from None

    # commands in the order of the workflow, not alphabetically: extract, look, train, compare, use
    ORDER = ("extract", "info", "layers", "fit-head", "runs", "evaluate", "predict", "export", "finetune")

    def list_commands(self, ctx) -> list[str]:
        names = super().list_commands(ctx)
        return sorted(names, key=lambda n: (self.ORDER.index(n) if n in self.ORDER else len(self.ORDER), n))

    def main(self, args=None, *rest, **extra):
        if args is None:  # the command's own process (not a test runner): faster imports and exit
            startup.install()
        try:
            with sigterm_as_interrupt():
                self._main(args, *rest, **extra)
        finally:
            if args is None:  # the real program, not a test runner: the exit code is decided now, and a
                # Ctrl-C or SIGTERM during interpreter teardown would otherwise kill the process by the signal
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                startup.freeze()

    def _main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        warnings.showwarning = _warning_line
        self.subcommand = None
        try:
            rv = super().main(args, prog_name or "featcache", complete_var, standalone_mode=False, **extra)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.ClickException as e:
            fail(e.format_message(), e.exit_code)
        except FeatcacheError as e:
            fail(str(e))
        except (_Interrupted, click.Abort, KeyboardInterrupt) as e:  # click turns KeyboardInterrupt into Abort
            hint = RESUME_HINT.get(self.subcommand or "")
            fail("interrupted" + (f"; {hint}" if hint else ""), e.status if isinstance(e, _Interrupted) else
                 interrupt_status(e))
        except Exception as e:  # a bug, not bad input: still one line unless debugging
            if os.environ.get("FEATCACHE_DEBUG"):
                raise
            fail(f"internal error: {type(e).__name__}: {e} (set FEATCACHE_DEBUG=1 for the traceback)")
        sys.exit(rv if isinstance(rv, int) else 0)


class _Interrupted(Exception):
    """A command stopped by Ctrl-C or SIGTERM after its cleanup ran; ``status`` is 130 or 143."""

    def __init__(self, status: int):
        super().__init__("interrupted")
        self.status = status


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    """Library warnings as one line on stderr each (FeatcacheWarning and the rest alike)."""
    click.echo(f"featcache: warning: {' '.join(str(message).split())}", err=True)


def emit(summary: dict, as_json: bool, lines: list[str]) -> None:
    """``--json``: one JSON object on stdout and nothing else; otherwise human lines."""
    if as_json:
        click.echo(json.dumps(summary, default=str))
    else:
        for line in lines:
            click.echo(line)


def progress_enabled(as_json: bool) -> bool:
    """Progress bars go to stderr, and only when it is a terminal: a log or a pipe gets the
    summary and, on failure, exactly one error line (``as_json`` changes nothing here)."""
    return sys.stderr.isatty()


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="featcache", message="%(prog)s %(version)s")
@click.option("--verbose", is_flag=True, help="Also show the libraries' own log lines (PyTorch's) on stderr.")
@click.pass_context
def main(ctx: click.Context, verbose: bool) -> None:
    """Run a frozen CNN once, cache its features in HDF5, train many heads in seconds."""
    ctx.command.subcommand = ctx.invoked_subcommand
    if not verbose:
        startup.quiet_library_logs()


@main.command()
@click.argument("image_dir", metavar="SOURCE", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(), help="Cache file to create or update (.h5).")
@click.option("--backbone", default=ExtractConfig.backbone, show_default=True,
              help="torchvision model name, timm:NAME[.TAG][@SIZE] (any timm model; @SIZE = input pixels) "
                   "or efficientnet_lite0 (bundled ImageNet weights).")
@click.option("--weights", default=ExtractConfig.weights, show_default=True,
              help="DEFAULT (torchvision's or timm's pretrained), a torchvision weights enum name, none "
                   "(seeded random init), or a PATH (.safetensors or state_dict).")
@click.option("--layer", default=None, help="Layer(s) to read, comma list = one pass, concatenated (`featcache layers BACKBONE` "
                   "lists them; default: the classifier's input).")
@click.option("--pool", type=click.Choice(["avg", "max", "flatten"]), default=None,
              help="Reduce each spatial map or token sequence (default: flatten for the default layer, avg for "
                   "--layer; flat layers are stored as they are).")
@click.option("--batch-size", default=64, show_default=True, type=int)
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@click.option("--workers", default=None, type=int,
              help="Decoding processes prefetching during compute; 0 = a thread pool in this process "
                   "(default: CPU: one thread per core, taking turns with compute; CUDA: a process per spare core).")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True)
@click.option("--seed", default=0, show_default=True, type=int, help="Seed for --weights none and --augment views.")
@click.option("--overwrite", is_flag=True, help="Replace a cache built with a different configuration.")
@click.option("--prune", is_flag=True,
              help="Allow an update that removes more than half of the cache's images, all of them, or its views.")
@click.option("--verify-content", is_flag=True, help="Detect changed images by sha256, not size+mtime.")
@click.option("--max-skipped", default=0.5, show_default=True, type=float, help="Fail above this unusable fraction.")
@click.option("--optimize/--no-optimize", default=True, show_default=True,
              help="Fastest faithful backbone (BN folding, channels_last). --no-optimize runs the reference "
                   "eager NCHW model (fp32 unless --amp says otherwise).")
@click.option("--amp", type=click.Choice(["auto", "bf16", "fp16", "off"]), default="auto", show_default=True,
              help="Autocast precision, recorded in the cache: auto = bf16 on CUDA GPUs that run it natively, else "
                   "fp16; off on the CPU and with --no-optimize. off = fp32 (TF32 disabled).")
@click.option("--compile", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="torch.compile the backbone; auto = only for jobs large enough to repay compiling "
                   "(CPU: 10k+ images).")
@click.option("--draft/--no-draft", default=True, show_default=True,
              help="Decode large JPEGs at reduced scale (shorter side >= 2x the resize) before resizing.")
@click.option("--augment", default=0, show_default=True, type=int,
              help="Also store this many augmented views of each train-split image (seeded by --seed).")
@click.option("--augment-scale", default=(0.08, 1.0), show_default=True, type=(float, float),
              help="RandomResizedCrop area range of the views (min max).")
@click.option("--augment-flip", default=0.5, show_default=True, type=float, help="Horizontal flip probability.")
@click.option("--augment-rotate", default=0.0, show_default=True, type=float,
              help="Max rotation in degrees before the crop (0 = none).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON summary on stdout.")
def extract(image_dir, output, as_json, **opts) -> None:
    """Run the frozen backbone over SOURCE once and store features in an HDF5 cache.

    SOURCE is an image folder (CLASS/IMAGE or SPLIT/CLASS/IMAGE) or a .csv/.tsv manifest with a
    header and columns path,label[,split] (paths relative to the manifest's folder; empty label =
    unlabeled; split train, val or test, default train).
    """
    from featcache.pipeline.extraction.quickcheck import up_to_date

    cfg = ExtractConfig(image_dir=image_dir, output=output, **opts)
    s = up_to_date(cfg)  # nothing changed: answered from the cache, without importing torch
    if s is None:
        from featcache.pipeline.extraction.extract import run_extract

        s = run_extract(cfg, progress=progress_enabled(as_json))
    if s is None:  # a torchrun rank other than 0: rank 0 reports for everyone
        return
    emit(s, as_json, [
        f"{s['cache']}: {s['n_images']} images x {s['feature_dim']} features ({s['backbone']}, {s['weights']})",
        f"extracted {s['extracted']}, reused {s['reused']}, removed {s['removed']}, skipped {s['skipped']} "
        f"in {s['seconds']:.1f}s" + (f" ({s['images_per_second']} img/s)" if s["images_per_second"] else ""),
        *([f"resumed an interrupted run: {s['resumed_batches']} batch(es) came from its journal"]
          if s.get("resumed_batches") else []),
        *([f"augmented views: {s['views']['per_image']} per train image, {s['views']['images']} images"]
          if "views" in s else []),
        *([f"dropped /views ({s['views_dropped']} per train image; --prune)"] if s.get("views_dropped") else []),
    ])
    if not as_json:  # diagnostics, not results: stderr, as the README says
        for p, r in s["skipped_files"]:
            click.echo(f"  skipped {p}: {r}", err=True)


@main.command()
@click.argument("cache", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def info(cache, as_json) -> None:
    """Show a cache's shape, classes, splits and recorded attributes."""
    from featcache.cache.info import cache_info, info_lines

    data = cache_info(cache)
    emit(data, as_json, info_lines(data))


@main.command()
@click.argument("backbone")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def layers(backbone, as_json) -> None:
    """List the layer names --layer accepts for BACKBONE, with output shapes (random init, no download)."""
    from featcache.pipeline.extraction.backbones import list_layers

    s = list_layers(backbone)
    width = max(len(r["name"]) for r in s["layers"])
    emit(s, as_json, [f"{s['backbone']} at {s['input_size']}x{s['input_size']}: layer, output shape per image, "
                      "features once pooled (--pool avg/max)",
                      *(f"  {r['name']:<{width}}  {'x'.join(map(str, r['shape'])):<14} {r['features']}" for r in s["layers"])])


def _c_path(C: str | None, opts: dict) -> tuple[float, ...] | None:
    """--C and --solver as heads.fit.resolve_solver settles them (opts["solver"] and the solver
    note, opts["note"], are updated)."""
    from featcache.pipeline.heads.fit import EPOCH_OPTIONS, resolve_solver

    ctx = click.get_current_context()
    given = {o for o in EPOCH_OPTIONS if ctx.get_parameter_source(o) == click.core.ParameterSource.COMMANDLINE}
    opts["solver"], c, opts["note"] = resolve_solver(ctx.params["head"], opts["solver"],
                                                     None if C is None else float_list(C, "--C"), given)
    return c


@main.command("fit-head")
@click.argument("cache", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(), help="Run folder for head.pt, metrics, leaderboard, plots.")
@click.option("--head", type=click.Choice(kinds.names()), default=HeadConfig.head, show_default=True,
              help="; ".join(f"{name}: {kinds.get(name).summary}" for name in kinds.names()) + ".")
@click.option("--hidden", multiple=True, default=["512"], show_default=True,
              help="Hidden sizes of one MLP, e.g. 512,256; repeat to sweep; a list with 0 sweeps widths (0 = linear).")
@click.option("--dropout", default="0.5", show_default=True, help="Dropout after hidden layers (comma list sweeps).")
@click.option("--weight-decay", default="1e-4", show_default=True, help="L2 on weights, not biases/norms.")
@click.option("--l1", default="0", show_default=True, help="L1 penalty on weights.")
@click.option("--batchnorm", is_flag=True, help="Batch norm after each hidden layer.")
@click.option("--optimizer", default="adam", show_default=True, help="adam, adamw or sgd (comma list sweeps).")
@click.option("--lr", default="1e-3", show_default=True)
@click.option("--momentum", default="0.9", show_default=True, help="SGD momentum.")
@click.option("--C", "C", default=None,
              help="Inverse L2 strength, sklearn's C (comma list sweeps) of --head logreg [default: 1e-4,1e-3,1e-2,"
                   "1e-1,1] and of the exact linear probe [default: 10 values, 1e-4..10].")
@click.option("--solver", type=click.Choice(["auto", "exact", "epochs"]), default="auto", show_default=True,
              help="--head linear: exact = L-BFGS to sklearn's LogisticRegression optimum over --C; epochs = "
                   "mini-batch training over --lr/--weight-decay; auto = exact unless --l1 > 0, augmented views "
                   "or an epoch option (--lr, --weight-decay, --optimizer, --momentum, --epochs, --batch-size, "
                   "--patience) is given.")
@click.option("--search", type=click.Choice(["grid", "random"]), default="grid", show_default=True,
              help="grid: every combination; random: --trials samples, each list read as a range "
                   "(log-uniform for lr/weight-decay/l1/C, uniform for dropout/momentum).")
@click.option("--trials", default=None, type=int, help="Configurations sampled by --search random [default: 20].")
@click.option("--epochs", default=100, show_default=True, type=int)
@click.option("--batch-size", default=256, show_default=True, type=int)
@click.option("--patience", default=10, show_default=True, type=int, help="Early-stopping patience; 0 disables.")
@click.option("--val-fraction", default=0.2, show_default=True, type=float, help="Hold-out when the cache has no val split.")
@click.option("--standardize/--no-standardize", default=True, show_default=True)
@click.option("--refit", is_flag=True, help="Retrain the winner on train+val (its best epoch count), then test.")
@click.option("--plots/--no-plots", default=True, show_default=True, help="Write PNG curves, confusion and sweep plots.")
@click.option("--layers", multiple=True,
              help="Train on these layers of a multi-layer cache (comma list, e.g. blocks.3,blocks.4); "
                   "repeat to sweep layer sets [default: every column].")
@click.option("--use-augmented/--no-use-augmented", default=None,
              help="Train on one augmented view per image per epoch (val/test stay un-augmented) "
                   "[default: when the cache has views].")
@click.option("--drop-nonfinite", is_flag=True,
              help="Leave out rows whose cached features hold NaN/Inf (default: refuse such a cache).")
@click.option("--overwrite", is_flag=True, help="Replace an existing run folder (the old one stays until the new is whole).")
@click.option("--views-keep-original", default=0.0, show_default=True, type=float,
              help="Probability that an epoch's draw of a row is its un-augmented features instead of a view.")
@click.option("--cv", default=0, show_default=True, type=int,
              help="Stratified K-fold CV over the train rows, ranked by mean fold accuracy; the winner is "
                   "refitted on all train rows and scored on val/test (0 = off).")
@click.option("--train-sizes", default=None,
              help="Learning curve: training images per class, e.g. 10,50,all (learning_curve.png).")
@click.option("--k", "k", default=",".join(map(str, HeadConfig.k)), show_default=True,
              help="--head knn: neighbours (comma list: every k scored from one similarity computation).")
@click.option("--knn-temperature", default=",".join(map(str, HeadConfig.knn_temperature)), show_default=True,
              help="--head knn: vote weight exp(similarity / T) (DINO's); --head centroid: softmax temperature.")
@click.option("--knn-voting", default=",".join(HeadConfig.knn_voting), show_default=True,
              help="--head knn: temperature (weighted) or majority (one vote per neighbour); comma list sweeps.")
@click.option("--class-weight", default=None,
              help="balanced (n / (classes * n_class)) or CLASS=WEIGHT,... pairs: weights of the training loss "
                   "(every head that trains).")
@click.option("--select-by", type=click.Choice(SELECT_BY), default=HeadConfig.select_by, show_default=True,
              help="Rank configurations by this val score (balanced_accuracy, macro_f1 for imbalanced classes).")
@click.option("--max-memory", default=HeadConfig.max_memory,
              help="Memory fit-head may use beyond its ~1 GB runtime (e.g. 4G): features that do not fit are "
                   "streamed from the cache; a run that does not fit streamed is refused [default: the memory "
                   "available].")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--device", default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON summary on stdout.")
def fit_head(cache, output, hidden, dropout, weight_decay, l1, optimizer, lr, momentum, C, layers, train_sizes,
             k, knn_temperature, knn_voting, class_weight, as_json, **opts) -> None:
    """Train heads on cached features (comma lists sweep); keep the best by validation accuracy."""
    from featcache.pipeline.heads.fit import run_fit_head
    from featcache.pipeline.heads.layersets import parse_layer_sets
    from featcache.pipeline.heads.report import fit_lines, parse_class_weight, parse_hidden, parse_train_sizes

    c = _c_path(C, opts)
    note = opts.pop("note")
    cfg = HeadConfig(
        cache=cache, output=output, hidden=parse_hidden(hidden), dropout=float_list(dropout, "--dropout"),
        weight_decay=float_list(weight_decay, "--weight-decay"), l1=float_list(l1, "--l1"),
        optimizer=str_list(optimizer, "--optimizer"), lr=float_list(lr, "--lr"),
        momentum=float_list(momentum, "--momentum"), C=c, layers=parse_layer_sets(layers),
        train_sizes=parse_train_sizes(train_sizes), k=int_list(k, "--k"),
        knn_temperature=float_list(knn_temperature, "--knn-temperature"),
        knn_voting=str_list(knn_voting, "--knn-voting"), class_weight=parse_class_weight(class_weight), **opts)
    s = run_fit_head(cfg, progress=progress_enabled(as_json), note=note)
    emit({k: v for k, v in s.items() if k != "leaderboard" or len(v) > 1}, as_json, fit_lines(s))


@main.command()
@click.argument("experiments_dir", type=click.Path())
@click.option("--sort", type=click.Choice(["val", "test", "train", "run"]), default="val", show_default=True,
              help="Order by that accuracy (best first) or by run folder.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def runs(experiments_dir, sort, as_json) -> None:
    """Compare every fit-head run below EXPERIMENTS_DIR (backbone, cache, head, accuracies) in one table."""
    from featcache.pipeline.heads.runs import find_runs, runs_lines

    data = find_runs(experiments_dir, sort)
    emit(data, as_json, runs_lines(data))


@main.command()
@click.argument("model", type=click.Path())
@click.argument("images", nargs=-1, required=True, metavar="SOURCE...", type=click.Path())
@click.option("--top-k", default=5, show_default=True, type=int)
@click.option("--batch-size", default=32, show_default=True, type=int)
@click.option("--device", default="auto", show_default=True)
@click.option("--csv", "csv_path", type=click.Path(), default=None, help="Also write predictions to this CSV file.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def predict(model, images, as_json, **opts) -> None:
    """Classify SOURCE... (image files, folders, .csv/.tsv manifests) with a fit-head RUN_DIR or a finetune FT_DIR.

    A manifest's listed images are predicted; where its rows have labels, an accuracy line follows.
    """
    from featcache.pipeline.use.predict import PredictConfig, predict_lines, run_predict

    s = run_predict(PredictConfig(model=model, inputs=tuple(images), **opts), progress=progress_enabled(as_json))
    emit(s, as_json, predict_lines(s))


@main.command()
@click.argument("head", type=click.Path())
@click.argument("cache", type=click.Path())
@click.option("--device", default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def evaluate(head, cache, device, as_json) -> None:
    """Score a saved head (RUN_DIR or head.pt) on a cache it was trained for."""
    from featcache.pipeline.heads.evaluate import run_evaluate
    from featcache.pipeline.heads.report import per_class_lines

    s = run_evaluate(head, cache, device)
    tables = [ln for k, v in s.items() if k.endswith("_per_class") for ln in per_class_lines(k[:-10], v)]
    emit(s, as_json, [f"{k}: {v}" for k, v in s.items() if not k.endswith("_per_class")] + tables)


@main.command()
@click.argument("model", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(), help="model.pt2 (torch.export) or model.pt (TorchScript).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def export(model, output, as_json) -> None:
    """Write backbone + head as one file that loads without featcache."""
    from featcache.pipeline.use.export import run_export

    s = run_export(model, output)
    emit(s, as_json, [f"wrote {s['output']} ({s['format']}, {s['bytes'] / 1e6:.1f} MB): input (N, 3, {s['input_size']}, "
                      f"{s['input_size']}) preprocessed as recorded in featcache.json, output probabilities over "
                      f"{len(s['classes'])} classes"])


@main.command()
@click.argument("image_dir", metavar="SOURCE", type=click.Path())
@click.option("--from", "run_dir", required=True, type=click.Path(), help="fit-head RUN_DIR to start from.")
@click.option("-o", "--output", required=True, type=click.Path(), help="Folder for model.pt, model.json, metrics.json.")
@click.option("--unfreeze", default=FinetuneConfig.unfreeze, show_default=True,
              help="all, or the number of last backbone blocks to train.")
@click.option("--epochs", default=FinetuneConfig.epochs, show_default=True, type=int,
              help="Planned epochs: the learning rate warms up, then decays to 0 at the last.")
@click.option("--batch-size", default=FinetuneConfig.batch_size, show_default=True, type=int)
@click.option("--lr", default=FinetuneConfig.lr, show_default=True, type=float, help="Head learning rate (AdamW), peak.")
@click.option("--backbone-lr-mult", default=FinetuneConfig.backbone_lr_mult, show_default=True, type=float,
              help="Backbone lr = lr x this.")
@click.option("--weight-decay", default=FinetuneConfig.weight_decay, show_default=True, type=float,
              help="Not on biases or norm parameters.")
@click.option("--patience", default=FinetuneConfig.patience, show_default=True, type=int,
              help="Epochs without a better val accuracy before stopping; 0 = never stop early.")
@click.option("--val-fraction", default=FinetuneConfig.val_fraction, show_default=True, type=float)
@click.option("--augment", type=click.Choice(list(FT_AUGMENT)), default=FinetuneConfig.augment, show_default=True,
              help=f"Random crops + flips: mild (crops of {FT_AUGMENT['mild'][0]:.0%}-100% of the area), "
                   f"strong ({FT_AUGMENT['strong'][0]:.0%}-100%), none.")
@click.option("--image-size", default=FinetuneConfig.image_size, type=int,
              help="Side fed to the backbone, pixels, e.g. the images' own (default: the run's preprocessing).")
@click.option("--workers", default=FinetuneConfig.workers, type=int,
              help="Decoding processes (default: CUDA: one per spare core, into pinned memory; CPU: 0 = this process).")
@click.option("--device", default=FinetuneConfig.device, show_default=True)
@click.option("--seed", default=FinetuneConfig.seed, show_default=True, type=int)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON summary on stdout.")
def finetune(image_dir, run_dir, output, as_json, **opts) -> None:
    """Fine-tune backbone + trained head on SOURCE (an image folder or a .csv/.tsv manifest, as for
    extract; its classes must be the head's), starting from the cached-feature solution."""
    from featcache.pipeline.use.finetune import run_finetune

    s = run_finetune(FinetuneConfig(image_dir=image_dir, run_dir=run_dir, output=output, **opts),
                     progress=progress_enabled(as_json))
    emit(s, as_json, [f"frozen-head val accuracy {s['frozen_head_val_accuracy']}, fine-tuned val accuracy "
                      f"{s.get('val_accuracy')} (best epoch {s['best_epoch']} of {s['epochs_run']}); saved {s['ft_dir']}"])


if __name__ == "__main__":
    main()
