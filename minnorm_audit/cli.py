"""The ``minnorm-audit`` command line: run, report, demo."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click

from . import __version__

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "show_default": True}
EXIT_QA_GATE = 3
# --fail-on-flagged on an inconclusive audit (the network has not learned the data, so
# the flags say nothing either way): neither a pass (0) nor a fail (3).
EXIT_INCONCLUSIVE = 4
EXIT_INTERRUPTED = 130


class DeviceName(click.ParamType):
    """``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` (checked as text here; whether
    the device exists is checked when training starts)."""

    name = "[auto|cpu|cuda|cuda:N|mps]"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = str(value).strip().lower()
        kind, colon, index = text.partition(":")
        if text in ("auto", "cpu", "cuda", "mps") or (kind == "cuda" and colon and index.isdigit()):
            return text
        self.fail(f"{value!r} is not a device: use auto, cpu, cuda, cuda:N (e.g. cuda:1) or mps", param, ctx)


def _training_options(function: Any, *, image_size: int | None = None) -> Any:
    """Options shared by ``run`` and ``demo``."""
    from .options import TrainConfig  # not training's re-export: that imports torch

    defaults = TrainConfig()
    options = [
        click.option("--model", default="auto", help="auto (MLP for tables, plain CNN for images, the text network for a text column, a linear head on --backbone features), linear, mlp, cnn, text, or a torchvision model name (trained from random weights: for pretrained ones use --backbone)."),
        click.option("--epochs", type=click.IntRange(min=1), default=None, help="Training epochs (the stopping rule: a fixed dual-time budget) [default: 10 for the MLP on a classification task when that is at least 150 optimizer steps, else 20]."),
        click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Examples per optimizer step [default: 128, or examples / 8 (at least 8) below 1,024 examples, so that small sets get enough steps to fit]."),
        click.option("--optimizer", type=click.Choice(["adam", "adamw", "sgd"]), default=defaults.optimizer, help="Base optimizer Minnorm wraps."),
        click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=defaults.lr, help="Weight learning rate."),
        click.option("--dual-lr", type=click.FloatRange(min=0, min_open=True), default=defaults.dual_lr, help="Multiplier (dual ascent) step size."),
        click.option("--score-state", type=click.Choice(["violation", "average", "final"]), default=defaults.score_state, help="Which state of the multipliers is scored: the mean violation (dual ascent before projection), the multipliers' mean over epochs, or the final ones (see docs/benchmarks.md)."),
        click.option("--multiplier-cap", type=click.FloatRange(min=0, min_open=True), default=defaults.multiplier_cap, help="Soft-margin cap: no multiplier exceeds CAP x the 90th percentile of the examples' largest multipliers."),
        click.option("--no-multiplier-cap", is_flag=True, help="Train the hard-margin problem (no cap)."),
        click.option("--multiplier-store", type=click.Choice(["auto", "dense", "compact"]), default=defaults.multiplier_store, help="Where the multipliers live: a dense examples x classes table, or the top-k classes per example (compact; auto: when the dense table would pass --multiplier-memory-gb)."),
        click.option("--multiplier-memory-gb", type=click.FloatRange(min=0, min_open=True), default=defaults.multiplier_memory_gb, help="Budget (GB) for all per-example training state, which picks the multiplier store and its slots."),
        click.option("--device", type=DeviceName(), default="auto", help="auto (a CUDA GPU, then MPS, then the CPU), cpu, cuda, cuda:N (GPU number N) or mps."),
        click.option("--seed", type=int, default=0),
        click.option("--deterministic", is_flag=True, help="Deterministic kernels (slower on GPU)."),
        click.option("--max-memory-gb", type=click.FloatRange(min=0), default=None, help="Most GiB of decoded data held in memory (host, and GPU for the on-device copy); larger image sets are decoded per batch from disk [default: half of the memory available]."),
        click.option("--workers", type=click.IntRange(min=0), default=defaults.workers, help="Worker processes decoding images: a pool for 2,000+ files decoded into memory (0: none), DataLoader workers for streamed ones."),
        click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads to compute with [default: OMP_NUM_THREADS or MKL_NUM_THREADS when set, else one per 0.25 GMAC of a training step's forward pass, at most the cores: 1 for the MLP on a table, more for a CNN on large images]."),
        click.option("--checkpoint-seconds", type=click.FloatRange(min=0), default=defaults.checkpoint_seconds, help="Rewrite the resume checkpoint once this many seconds have passed since the last write (0: after every epoch); it is always written after the last epoch and on Ctrl-C."),
        click.option("--image-size", type=click.IntRange(min=8), default=image_size, show_default=image_size is not None, help="Images are resized to SIZE x SIZE (aspect not kept, nothing cropped) [default: 224 with --backbone, else 32]." if image_size is None else "Images are resized to SIZE x SIZE (aspect not kept, nothing cropped)."),
        click.option("--flag-fraction", type=click.FloatRange(0, 1, min_open=True), default=None, help="Flag this top fraction by difficulty instead of the automatic split."),
        click.option("--threshold", type=float, default=None, help="Flag examples with difficulty >= this (overrides --flag-fraction)."),
        click.option("--gallery-size", type=click.IntRange(min=0), default=60, help="Flagged examples per page of report.html's gallery, and how many of each section keep a thumbnail or feature row in gallery.parquet (every flagged example can be paged to)."),
        click.option("--quiet", is_flag=True, help="No progress bar or messages on stderr."),
        click.option("--json", "json_output", is_flag=True, help="Print summary.json to stdout."),
        click.option("--debug", is_flag=True, help="Show tracebacks."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


@click.group(context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, "-V", "--version", prog_name="minnorm-audit")
def main() -> None:
    """Find mislabeled and hard examples in a labeled dataset.

    Trains a network with Minnorm training and scores each example by how hard its
    Lagrange multipliers had to push to fit its given label.
    """


def _settings(options: dict[str, Any], **overrides: Any):  # type: ignore[no-untyped-def]
    from .audit import AuditOptions
    from .training import TrainConfig

    train = TrainConfig(
        epochs=options["epochs"],
        batch_size=options["batch_size"],
        optimizer=options["optimizer"],
        lr=options["lr"],
        dual_lr=options["dual_lr"],
        seed=options["seed"],
        device=options["device"],
        deterministic=options["deterministic"],
        max_memory_gb=options["max_memory_gb"],
        workers=options["workers"],
        checkpoint_seconds=options["checkpoint_seconds"],
        score_state=options["score_state"],
        multiplier_cap=None if options["no_multiplier_cap"] else options["multiplier_cap"],
        multiplier_store=options["multiplier_store"],
        multiplier_memory_gb=options["multiplier_memory_gb"],
    )
    return AuditOptions(
        backbone=options.get("backbone"),
        weights=options.get("weights"),
        finetune=bool(options.get("finetune", False)),
        model=options["model"],
        image_size=options["image_size"],
        flag_fraction=options["flag_fraction"],
        threshold=options["threshold"],
        gallery_size=options["gallery_size"],
        threads=options["threads"],
        train=train,
        **overrides,
    )


def _fail(error: BaseException, debug: bool) -> None:
    if debug:
        raise error
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    raise click.ClickException(message) from error


def _echo_summary(summary: dict[str, Any], run_dir: Path, quiet: bool, json_output: bool) -> None:
    from .training import is_main_process
    from .report.parquet import to_strict_json

    if not is_main_process():  # under torchrun, rank 0 alone prints
        return

    if json_output:
        click.echo(json.dumps(to_strict_json(summary), indent=2))
    if quiet:
        return
    counts = summary["counts"]
    click.echo(
        f"{summary['num_examples']} examples audited ({summary['num_set_aside']} set aside): "
        f"{counts['mislabeled']} likely mislabeled, {counts['hard']} hard, {counts.get('outlier', 0)} outliers, "
        f"{counts['ok']} ok",
        err=True,
    )
    click.echo(f"report: {run_dir / 'report.html'}", err=True)
    click.echo(f"table:  {run_dir / 'examples.parquet'}", err=True)
    inconclusive = summary.get("inconclusive")
    # A class the network never learned: no clean bill (an inconclusive run says it for all).
    for finding in [] if inconclusive else summary.get("not_learned") or []:
        click.echo(f"warning: {finding['finding']}", err=True)
    if inconclusive:  # the last line: the flags above are not to be trusted
        click.echo(f"audit inconclusive: {inconclusive['reason']}; do not act on these flags", err=True)


def _column_list(values: tuple[str, ...]) -> list[str] | None:
    """``--feature-columns a,b --feature-columns c`` -> ``["a", "b", "c"]``; None when not given."""
    names = [name.strip() for value in values for name in value.split(",") if name.strip()]
    return names or None


# --resume: the checkpoint keeps the run's settings (AuditOptions.to_record()) and they
# are reused. An option given on the command line that differs from them is refused,
# except those below, which change where the run goes on or how it is flagged and
# shown, not what is trained; --epochs may differ but not go below the epochs done.
_RESUME_FREE_OPTIONS = frozenset({"device", "workers", "max_memory_gb", "deterministic", "flag_fraction", "threshold",
                                  "gallery_size", "epochs", "checkpoint_seconds", "threads"})
# Each option of `run` that is a setting -> its place in the settings record.
_SETTING_OF_OPTION = {
    "data_format": ("format",), "label_column": ("label_column",), "path_column": ("path_column",),
    "data_root": ("data_root",), "task": ("task",), "feature_columns": ("feature_columns",),
    "ignore_columns": ("ignore_columns",), "split_folders": ("split_folders",), "text_column": ("text_column",),
    "model": ("model",), "image_size": ("image_size",),
    "flag_fraction": ("flag_fraction",), "threshold": ("threshold",), "gallery_size": ("gallery_size",),
    "threads": ("threads",),
    **{name: ("train", name) for name in (
        "epochs", "batch_size", "optimizer", "lr", "dual_lr", "score_state", "multiplier_cap", "multiplier_store",
        "multiplier_memory_gb", "device", "seed", "deterministic", "max_memory_gb", "workers",
        "checkpoint_seconds")},
    "no_multiplier_cap": ("train", "multiplier_cap"),
    "backbone": ("backbone",), "weights": ("weights",), "finetune": ("finetune",),
}


def _resumed_settings(ctx: click.Context, settings: Any, resume_dir: Path, *, quiet: bool) -> Any:
    """The settings stored in RESUME_DIR's checkpoint, with the options given on the
    command line that may change; one line naming an option that conflicts."""
    from click.core import ParameterSource

    from .audit import CHECKPOINT_FILE, AuditOptions
    from .training import read_run_settings

    checkpoint = resume_dir / CHECKPOINT_FILE
    stored, epochs_done = read_run_settings(checkpoint)
    if stored is None:  # written before checkpoints kept their settings: the options as given
        return settings
    given = settings.to_record()
    merged = {**given, **{key: value for key, value in stored.items() if key != "train"},
              "train": {**given["train"], **(stored.get("train") or {})}}
    explicit = {name for name in _SETTING_OF_OPTION
                if ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT,
                                                      ParameterSource.PROMPT)}
    for option in sorted(explicit):
        place = _SETTING_OF_OPTION[option]
        value = given["train"][place[1]] if len(place) == 2 else given[place[0]]
        section = (stored.get("train") or {}) if len(place) == 2 else stored
        if place[-1] in section and not _same_setting(place[-1], value, section[place[-1]]):
            flag = "--format" if option == "data_format" else "--" + option.replace("_", "-")
            if option == "epochs" and value < epochs_done:
                raise click.ClickException(
                    f"--epochs {value} is fewer than the {epochs_done} epochs the run in {resume_dir} has finished; "
                    f"resume without --epochs to train to its {section['epochs']}"
                )
            if option not in _RESUME_FREE_OPTIONS:
                raise click.ClickException(
                    f"{flag} gives {place[-1]}={value!r}, but the run in {resume_dir} was trained with "
                    f"{section[place[-1]]!r}; resume without {flag} to reuse the run's settings, or start a new run"
                )
            if option == "epochs" and not quiet:  # nothing in an epoch depends on the planned total
                click.echo(f"note: training to {value} epochs; the run was started for {section['epochs']}", err=True)
        target = merged["train"] if len(place) == 2 else merged
        target[place[-1]] = value
    return AuditOptions.from_record(merged)


def _same_setting(name: str, given: Any, stored: Any) -> bool:
    if name == "data_root" and given is not None and stored is not None:
        return Path(given).expanduser().resolve() == Path(stored).expanduser().resolve()
    return bool(given == stored)


def _interrupted(data: Path, run_dir: Path) -> None:
    """Ctrl-C: say how to resume (the checkpoint of the last finished epoch is on disk)
    and exit 130, the shell's code for SIGINT."""
    import shlex

    from .audit import CHECKPOINT_FILE

    if (run_dir / CHECKPOINT_FILE).is_file():
        click.echo(f"interrupted; resume with: minnorm-audit run {shlex.quote(str(data))} "
                   f"--resume {shlex.quote(str(run_dir))}", err=True)
    else:
        click.echo("interrupted before the first checkpoint; nothing to resume", err=True)
    sys.exit(EXIT_INTERRUPTED)


def _qa_gate(summary: dict[str, Any], fail_on_flagged: float | None) -> None:
    """Exit 3 when more than ``fail_on_flagged`` of the examples are flagged mislabeled,
    4 when the audit is inconclusive (whatever the share), else return (exit 0)."""
    if fail_on_flagged is None:
        return
    inconclusive = summary.get("inconclusive")
    if inconclusive:
        from .training import is_main_process

        if is_main_process():
            click.echo(f"QA gate: the audit is inconclusive ({inconclusive['reason']}); exit {EXIT_INCONCLUSIVE}",
                       err=True)
        sys.exit(EXIT_INCONCLUSIVE)
    fraction = summary["counts"]["mislabeled"] / max(summary["num_examples"], 1)
    if fraction > fail_on_flagged:
        from .training import is_main_process

        if is_main_process():
            click.echo(
                f"QA gate: {fraction:.2%} of examples flagged mislabeled exceeds --fail-on-flagged {fail_on_flagged:.2%}",
                err=True,
            )
        sys.exit(EXIT_QA_GATE)


@main.command()
@click.argument("data", type=click.Path(exists=True, path_type=Path))
@click.option("--format", "data_format", type=click.Choice(["auto", "images", "manifest", "table"]), default="auto", help="Input layout (auto-detected).")
@click.option("--label-column", default="label", help="Label (or target) column of a manifest or table.")
@click.option("--path-column", default="path", help="Path column of a manifest.")
@click.option("--data-root", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None, help="Manifest: the folder its paths are relative to [default: the manifest's folder]; paths must stay inside it. Use it to re-audit a manifest written by `clean`.")
@click.option("--task", type=click.Choice(["classification", "regression"]), default="classification", help="regression uses the equality form on a real-valued target.")
@click.option("--feature-columns", "feature_columns", multiple=True, metavar="NAMES", help="Table: the feature columns, comma-separated or the option repeated [default: every column but the label, the ignored ones and a saved pandas index]. A column of lists (an embedding) may be named whole or as NAME[i].")
@click.option("--ignore-columns", "ignore_columns", multiple=True, metavar="NAMES", help="Table: columns that are not features (ids, notes, ...), comma-separated or the option repeated.")
@click.option("--split-folders", "split_folders", multiple=True, metavar="NAMES", help="Image folder: the top-level folders that are splits over the same class folders (DATA/<split>/<class>/...), comma-separated, or 'none' to read the top level as classes [default: detected when every top-level folder is a split name: train, val, valid, validation, test, dev, ...].")
@click.option("--text-column", default=None, metavar="NAME", help="Table: a column of free text, audited with the built-in text network [default: detected when no feature columns are named: a string column of long, mostly different values].")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None, help="Run folder [default: reports/<data-name>-<timestamp>].")
@click.option("--resume", "resume_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None, help="Continue the interrupted run in RUN_DIR with the settings it started with (kept in its checkpoint); an option given that would change what is trained is refused.")
@click.option("--backbone", default=None, metavar="NAME|FILE", help="Audit images through a pretrained network: a torchvision name with its weights (resnet50, resnet50:IMAGENET1K_V2, vit_b_16, ...), a timm name (when timm is installed), a TorchScript file or an ONNX file (needs onnxruntime). A file is a function from a float batch N x 3 x H x W in [0, 1] (at --image-size) to features N x D. Names are preprocessed with their weights' own transforms; weights come from the torch hub cache (TORCH_HOME) or the Hugging Face cache, or --weights.")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None, help="A state dict file for the --backbone name (instead of the library's cache).")
@click.option("--finetune", is_flag=True, help="Train the whole --backbone network with Minnorm, the norm term being the change from the pretrained weights, 1/2 sum ||W - W0||^2 [default: frozen: a Minnorm head on features computed once and cached in the run folder].")
@click.option("--fail-on-flagged", type=click.FloatRange(0, 1), default=None, help="Exit 3 when the fraction flagged mislabeled exceeds this, 4 when the audit is inconclusive (the network has not learned the data, so the flags say nothing either way); after writing outputs.")
@_training_options
def run(data: Path, data_format: str, label_column: str, path_column: str, data_root: Path | None, task: str,
        feature_columns: tuple[str, ...], ignore_columns: tuple[str, ...], split_folders: tuple[str, ...],
        text_column: str | None, out: Path | None, resume_dir: Path | None, fail_on_flagged: float | None,
        **options: Any) -> None:
    """Audit DATA (image folder, manifest or table) and write a run folder.

    \b
    Example:
        minnorm-audit run photos/ --out reports/photos
        minnorm-audit run embeddings.parquet --label-column class --json
        minnorm-audit run cleaned.csv --data-root photos/
        minnorm-audit run table.csv --ignore-columns id,notes
        minnorm-audit run reviews.csv --text-column review --label-column score
    """
    from .audit import default_run_dir, run_audit
    from .data import DataError, load_dataset
    from .training import TrainingError, exit_rank_after, is_main_process, teardown

    settings = _settings(options, format=data_format, label_column=label_column, path_column=path_column, task=task,
                         data_root=data_root, feature_columns=_column_list(feature_columns),
                         ignore_columns=_column_list(ignore_columns), split_folders=_column_list(split_folders),
                         text_column=text_column)
    run_dir = resume_dir or out or default_run_dir(data)
    try:
        if resume_dir is not None:
            settings = _resumed_settings(click.get_current_context(), settings, resume_dir, quiet=options["quiet"])
        started = time.perf_counter()
        loaded = load_dataset(data, format=settings.format, label_column=settings.label_column,
                              path_column=settings.path_column, task=settings.task, image_size=settings.resolved_image_size(),
                              data_root=settings.data_root, max_memory_gb=settings.train.max_memory_gb,
                              feature_columns=settings.feature_columns, ignore_columns=settings.ignore_columns,
                              workers=settings.train.workers, split_folders=settings.split_folders,
                              text_column=settings.text_column)
        load_seconds = time.perf_counter() - started
        if not options["quiet"] and is_main_process():
            for note in loaded.notes:
                click.echo(f"note: {note}", err=True)
        progress = not options["quiet"] and sys.stderr.isatty()
        result = run_audit(loaded, settings, run_dir, resume=resume_dir is not None, progress=progress,
                           load_seconds=load_seconds)
    except (DataError, TrainingError, ValueError, OSError) as error:
        _fail(error, options["debug"])
        return
    except KeyboardInterrupt:
        _interrupted(data, run_dir)
    finally:
        left_group = teardown()  # leaves the torchrun process group, if one was joined
    with exit_rank_after(left_group):  # a torchrun rank ends here (see exit_rank_after)
        _echo_summary(result.summary, result.run_dir, options["quiet"], options["json_output"])
        _qa_gate(result.summary, fail_on_flagged)


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--gallery-size", type=click.IntRange(min=1), default=None, help="Flagged examples per page of the gallery; every flagged example can be paged to [default: the run's --gallery-size].")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def report(run_dir: Path, gallery_size: int | None, debug: bool) -> None:
    """Re-render RUN_DIR/report.html from the run folder's files (no training).

    \b
    Example:
        minnorm-audit report reports/photos-20261127-101500
        minnorm-audit report reports/photos-20261127-101500 --gallery-size 200
    """
    from .report.html import render_report

    try:
        path = render_report(run_dir, gallery_size=gallery_size)
    except (OSError, ValueError, KeyError) as error:
        _fail(error, debug)
        return
    click.echo(str(path))


@main.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("reports/demo"), help="Where the demo's data and run folder go.")
@click.option("--noise-rate", type=click.FloatRange(0, 0.5, min_open=True), default=0.1, help="Share of labels flipped in the demo data.")
# The digits are 8x8 at heart: audited at that size the CNN trains in 4.8 s instead of
# 11.6 s at 16 (2 cores) and caught 175 of 180 flips at precision 93.1% (16: 172, 92.5%).
@lambda function: _training_options(function, image_size=8)
def demo(out: Path, noise_rate: float, **options: Any) -> None:
    """Audit the bundled digits with known flipped labels and score the flags.

    Writes the UCI digits as an image folder (OUT/data) with NOISE_RATE of the labels
    flipped, audits it exactly like ``run`` (OUT/run), and prints precision and recall
    of the mislabeled flag against the known flips.

    \b
    Example:
        minnorm-audit demo --out reports/demo
    """
    from .audit import run_audit
    from .data import DataError, load_dataset, write_demo_dataset
    from .training import TrainingError

    settings = _settings(options)
    try:
        if out.exists() and any(out.iterdir()):
            raise DataError(f"{out} already exists and is not empty; pass a new --out folder")
        out.mkdir(parents=True, exist_ok=True)
        written = write_demo_dataset(out / "data", noise_rate=noise_rate, seed=options["seed"])
        started = time.perf_counter()
        loaded = load_dataset(written.root, image_size=settings.resolved_image_size(), workers=settings.train.workers)
        load_seconds = time.perf_counter() - started
        progress = not options["quiet"] and sys.stderr.isatty()
        flipped = set(written.flipped_sources)
        # The page is rendered once, below, with the demo's figures in the summary.
        result = run_audit(loaded, settings, out / "run", progress=progress, load_seconds=load_seconds,
                           demo={"noise_rate": noise_rate, "num_flipped": len(flipped)}, render=False)
    except (DataError, TrainingError, ValueError, OSError) as error:
        _fail(error, options["debug"])
        return
    examples = result.examples
    flagged = set(examples.loc[examples["flag"] == "mislabeled", "source"])
    true_positives = len(flagged & flipped)
    precision = true_positives / len(flagged) if flagged else 0.0
    recall = true_positives / len(flipped) if flipped else 0.0
    recovered = examples[examples["source"].isin(flipped) & (examples["flag"] == "mislabeled")]
    recovered_right = sum(
        written.original_labels[source] == label
        for source, label in zip(recovered["source"], recovered["suggested_label"])
    )
    demo_figures = {
        "noise_rate": noise_rate,
        "num_flipped": len(flipped),
        "num_flagged_mislabeled": len(flagged),
        "precision": precision,
        "recall": recall,
        "suggested_label_accuracy_on_caught_flips": recovered_right / len(recovered) if len(recovered) else 0.0,
    }
    # The demo's figures belong in the run folder's summary and page as well.
    from .report.html import render_report
    from .report.parquet import write_json_atomic

    result.summary["demo"] = demo_figures
    write_json_atomic(result.run_dir / "summary.json", result.summary)
    render_report(result.run_dir)
    _echo_summary(result.summary, result.run_dir, options["quiet"], options["json_output"])
    click.echo(
        f"demo: {len(flipped)} labels flipped; the mislabeled flag caught {true_positives} "
        f"(precision {precision:.1%}, recall {recall:.1%}); suggested label right for "
        f"{demo_figures['suggested_label_accuracy_on_caught_flips']:.1%} of those",
        err=options["json_output"],
    )


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="The cleaned dataset file, .csv or .parquet (written outside the data; a trail file, and for CSV a provenance file, go beside it).")
@click.option("--rule", type=click.Choice(["drop-mislabeled", "drop-flagged", "drop-outliers", "relabel-mislabeled", "drop-duplicates", "none"]), default="drop-mislabeled", help="What to do where no reviewer decided: drop examples flagged mislabeled; drop every flagged example (mislabeled, hard and outlier); drop outliers; relabel mislabeled ones to the suggested label; keep one copy per duplicate group (train split first, then the supported label); or keep all. On an inconclusive audit a rule other than none acts on flags that are not to be trusted: clean warns.")
@click.option("--decisions", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None, help="A reviewer's decisions CSV (source, decision, label), e.g. downloaded from report.html; applied before the rule.")
@click.option("--quiet", is_flag=True, help="No messages on stderr.")
@click.option("--json", "json_output", is_flag=True, help="Print the provenance (rule, counts, paths, re-audit command) as JSON to stdout.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def clean(run_dir: Path, out: Path, rule: str, decisions: Path | None, quiet: bool, json_output: bool,
          debug: bool) -> None:
    """Write a cleaned copy of RUN_DIR's dataset (a new manifest); the data is never touched.

    Human decisions (--decisions) come first, the --rule applies where none was made.
    OUT holds the kept and relabeled examples, ready for training or a new audit;
    OUT's trail file records what happened to every example, dropped ones included.

    \b
    Example:
        minnorm-audit clean reports/photos --out cleaned.csv
        minnorm-audit clean reports/photos --out cleaned.parquet --rule relabel-mislabeled
        minnorm-audit clean reports/photos --out cleaned.csv --decisions decisions.csv
    """
    from .clean import CleanError
    from .clean import clean as clean_run
    from .report.parquet import to_strict_json

    try:
        result = clean_run(run_dir, out, rule=rule, decisions=decisions)
    except (CleanError, OSError, ValueError) as error:
        _fail(error, debug)
        return
    if json_output:
        click.echo(json.dumps(to_strict_json(result.provenance), indent=2))
    inconclusive = result.provenance.get("audit_inconclusive")
    if inconclusive and rule != "none":
        click.echo(f"warning: the audit was inconclusive ({inconclusive}); the rule {rule} acted on flags that "
                   "are not to be trusted. Prefer reviewer decisions with --rule none, or audit again.", err=True)
    if quiet:
        return
    counts = result.counts
    click.echo(
        f"{counts['rows_written']} examples written to {result.paths['manifest']} "
        f"({counts['kept']} kept, {counts['relabeled']} relabeled); {counts['dropped']} dropped "
        f"({counts['set_aside']} of them set aside in the run); {counts['by_reviewer']} reviewer "
        f"decision{'' if counts['by_reviewer'] == 1 else 's'}, "
        f"{counts['by_rule']} changes by the rule {rule}",
        err=True,
    )
    click.echo(f"trail:    {result.paths['trail']}", err=True)
    if result.rerun_command:
        click.echo(f"re-audit: {result.rerun_command}", err=True)
