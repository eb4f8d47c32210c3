"""Command-line interface: python -m core {train,evaluate,predict,submit,runs,make-demo}.

This module is the only place that configures logging handlers: stderr always,
plus `<run_dir>/train.log` while a run trains.
"""

from __future__ import annotations

import argparse
import json
import logging
import logging.handlers
import signal
import sys
import threading
from dataclasses import fields
from pathlib import Path

from core.datasets import AUGMENTATIONS, DatasetError
from core.models import PretrainedWeightsError, list_models
from core.runs import DEFAULT_RUNS_DIR, RunInUseError, describe_error, list_runs, resolve_run
from core.trainer import (
    ABLATION_VARIANTS,
    DEVICES,
    LOSSES,
    NORMALIZATIONS,
    OPTIMIZERS,
    SAMPLERS,
    SCHEDULERS,
    TrainConfig,
    CannotResumeError,
    create_run,
    resume,
    train,
)

logger = logging.getLogger("core")

# Errors caused by the user's input or environment: reported as one message, without a traceback.
# OSError covers paths that are folders, files or unwritable where the command needs otherwise.
USER_ERRORS = (ValueError, OSError, FloatingPointError, PretrainedWeightsError, DatasetError)
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _comma_list(text: str) -> list[str]:
    values = [value.strip() for value in text.split(",") if value.strip()]
    return [] if values == ["none"] else values


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = TrainConfig()
    data = parser.add_argument_group("data")
    data.add_argument("--data", help="dataset folder with train.csv (and data/ for images); "
                      "omitted: the generated demo dataset in ./demo-data")
    data.add_argument("--val-fraction", type=float, default=defaults.val_fraction,
                      help="share of labelled rows held out for validation")
    data.add_argument("--limit", type=int, help="use only the first N labelled rows, for quick trials")
    data.add_argument("--skip-bad-rows", action="store_true",
                      help="leave out rows that are invalid or whose image is missing or unreadable, and list them "
                           "in the run folder's skipped_rows.csv; without it such rows stop the run before training")

    model = parser.add_argument_group("model")
    model.add_argument("--model", default=defaults.model, choices=list_models(), help="architecture")
    model.add_argument("--captions", action=argparse.BooleanOptionalAction, default=defaults.captions,
                       help="fuse the caption trigram encoding into the first fully connected layer")
    model.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=None,
                       help="start the backbone from ImageNet weights (default: yes where the model has them)")
    model.add_argument("--weights", help="local backbone weights file to use instead of the default source")
    model.add_argument("--freeze-backbone", action="store_true", help="train only the head and caption branch")
    model.add_argument("--dropout", type=float, default=defaults.dropout,
                       help="dropout probability in the head; 0 disables dropout")
    model.add_argument("--batch-norm", action=argparse.BooleanOptionalAction, default=defaults.batch_norm,
                       help="batch normalisation after each convolution (basic_cnn, cnn2)")
    model.add_argument("--conv-layers", type=int, default=defaults.conv_layers, choices=(4, 5),
                       help="convolution layers of cnn2")
    model.add_argument("--fc-layers", type=int, choices=(1, 2, 3),
                       help="fully connected layers in the head (default: the model's own)")
    model.add_argument("--hidden-size", type=int, help="width of hidden fully connected layers (default: the model's own)")
    model.add_argument("--image-size", type=int, help="square input side in pixels (default: the model's native size)")

    preprocessing = parser.add_argument_group("preprocessing")
    preprocessing.add_argument("--normalization", default=defaults.normalization, choices=NORMALIZATIONS,
                               help="channel statistics: auto uses the pretrained weights' statistics, "
                                    "else the training images' own")
    preprocessing.add_argument("--augment", type=_comma_list, default=",".join(defaults.augment),
                               help=f"comma-separated augmentations from {','.join(AUGMENTATIONS)}, or none")

    loss = parser.add_argument_group("loss and label imbalance")
    loss.add_argument("--loss", default=defaults.loss, choices=LOSSES,
                      help="bce: binary cross-entropy with logits; soft_margin: multi-label soft margin")
    loss.add_argument("--pos-weight", action="store_true",
                      help="bce: weight each label's positives by its negatives/positives ratio")
    loss.add_argument("--sampler", default=defaults.sampler, choices=SAMPLERS,
                      help="weighted: draw rows with rare labels more often")

    optimisation = parser.add_argument_group("optimisation")
    optimisation.add_argument("--optimizer", default=defaults.optimizer, choices=OPTIMIZERS, help="optimizer")
    optimisation.add_argument("--lr", type=float, default=defaults.lr, help="learning rate")
    optimisation.add_argument("--weight-decay", type=float, default=defaults.weight_decay, help="weight decay")
    optimisation.add_argument("--scheduler", default=defaults.scheduler, choices=SCHEDULERS,
                              help="learning-rate schedule over the epochs")
    optimisation.add_argument("--epochs", type=int, default=defaults.epochs, help="passes over the training part")
    optimisation.add_argument("--batch-size", type=int, default=defaults.batch_size, help="rows per step")
    optimisation.add_argument("--seed", type=int, default=defaults.seed,
                              help="seed for the split, initialisation, shuffling and augmentation")

    system = parser.add_argument_group("system")
    system.add_argument("--device", default=defaults.device, choices=DEVICES,
                        help="auto picks CUDA, then Apple MPS, then the CPU")
    system.add_argument("--amp", action=argparse.BooleanOptionalAction, default=defaults.amp,
                        help="mixed precision: float16 or bfloat16 on CUDA, bfloat16 on CPUs that support it natively")
    system.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=defaults.channels_last,
                        help="channels-last memory format for image models")
    system.add_argument("--image-cache", action=argparse.BooleanOptionalAction, default=defaults.image_cache,
                        help="decode and resize each image once into a uint8 cache in RUNS_DIR/.cache/images; "
                             "without it, images are decoded again in every epoch")
    system.add_argument("--feature-cache", action=argparse.BooleanOptionalAction, default=defaults.feature_cache,
                        help="with --freeze-backbone: compute the backbone's features once and train the head on "
                             "them (augmentations are then not applied)")
    system.add_argument("--workers", type=int, help="data loading processes (default: one per spare CPU core, at most 8)")

    output = parser.add_argument_group("evaluation and output")
    output.add_argument("--threshold", type=float, default=defaults.threshold,
                        help="probability at which a label is predicted")
    output.add_argument("--tune-thresholds", action=argparse.BooleanOptionalAction, default=defaults.tune_thresholds,
                        help="tune per-label thresholds on the validation part for predict and submit")
    output.add_argument("--runs-dir", default=defaults.runs_dir, help="folder that contains the run folders")
    output.add_argument("--run-name", help="run folder name (default: <model>-<date>-<time>)")
    output.add_argument("--ablation-group", help="name shared by the runs of one ablation study (for the Compare page)")
    output.add_argument("--ablation-variant", choices=ABLATION_VARIANTS,
                        help="this run's role in its ablation study: the base run or the change against it")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except None, whose meaning the option's help explains."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    formatter = HelpFormatter
    # No abbreviated options: `--resume` must see every training option under its full name.
    parser = argparse.ArgumentParser(
        prog="python -m core", formatter_class=formatter, allow_abbrev=False,
        description="Train, evaluate and use multi-label image classifiers with captions.",
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="log debug messages")
    # The same flag after the subcommand; SUPPRESS keeps it from resetting a flag given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--verbose", "-v", action="store_true", default=argparse.SUPPRESS, help="log debug messages")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train_parser = commands.add_parser(
        "train", formatter_class=formatter, parents=[common], allow_abbrev=False,
        help="train a model; writes a run folder",
        description="Train a model and write a run folder under --runs-dir.")
    train_parser.add_argument("--resume", metavar="RUN",
                              help="continue an interrupted or failed run (folder or name under --runs-dir) from its "
                                   "last complete epoch, with its own settings; other training options are not allowed")
    add_train_arguments(train_parser)

    run_help = "run folder, or a run name under --runs-dir"
    evaluate_parser = commands.add_parser(
        "evaluate", formatter_class=formatter, parents=[common], allow_abbrev=False,
        help="score a run on its validation part or a labelled CSV",
        description="Score a run's checkpoint: samples, micro and macro F1 and per-label scores.")
    evaluate_parser.add_argument("run", help=run_help)
    evaluate_parser.add_argument("--csv", help="labelled CSV (ImageID,Labels,Caption) to score on instead of "
                                 "the run's validation part")
    evaluate_parser.add_argument("--images", help="image folder for --csv (default: data/ next to the CSV)")
    evaluate_parser.add_argument("--checkpoint", default="best", choices=("best", "last"), help="which checkpoint")
    evaluate_parser.add_argument("--json", action="store_true", help="print the full result as JSON")
    evaluate_parser.add_argument("--runs-dir", default=DEFAULT_RUNS_DIR, help="folder that contains the run folders")

    predict_parser = commands.add_parser(
        "predict", formatter_class=formatter, parents=[common], allow_abbrev=False,
        help="label one image and caption",
        description="Print every label's probability for one image and caption; predicted labels are marked.")
    predict_parser.add_argument("run", help=run_help)
    predict_parser.add_argument("--image", help="image file (required unless the run is caption-only)")
    predict_parser.add_argument("--caption", default="", help="caption text")
    predict_parser.add_argument("--top", type=int, help="print only the N most probable labels")
    predict_parser.add_argument("--checkpoint", default="best", choices=("best", "last"), help="which checkpoint")
    predict_parser.add_argument("--json", action="store_true", help="print the result as JSON")
    predict_parser.add_argument("--runs-dir", default=DEFAULT_RUNS_DIR, help="folder that contains the run folders")

    submit_parser = commands.add_parser(
        "submit", formatter_class=formatter, parents=[common], allow_abbrev=False,
        help="write a Kaggle-style ImageID,Labels file for test.csv",
        description="Predict every row of DATA/test.csv and write ImageID,Labels with space-separated label ids.")
    submit_parser.add_argument("run", help=run_help)
    submit_parser.add_argument("--data", required=True, help="dataset folder with test.csv (and data/ for images)")
    submit_parser.add_argument("--out", required=True, help="output CSV file")
    submit_parser.add_argument("--checkpoint", default="best", choices=("best", "last"), help="which checkpoint")
    submit_parser.add_argument("--runs-dir", default=DEFAULT_RUNS_DIR, help="folder that contains the run folders")

    runs_parser = commands.add_parser(
        "runs", formatter_class=formatter, parents=[common], allow_abbrev=False,
        help="list run folders with their metrics",
        description="List run folders, newest first, with status and best metrics.")
    runs_parser.add_argument("--runs-dir", default=DEFAULT_RUNS_DIR, help="folder that contains the run folders")
    runs_parser.add_argument("--json", action="store_true", help="print the list as JSON")

    queue_parser = commands.add_parser(
        "queue", formatter_class=formatter, parents=[common], allow_abbrev=False,
        help="run queued training jobs one at a time (the dashboard starts this)",
        description="Run the training jobs queued in RUNS_DIR/.jobs one at a time, then exit.")
    queue_parser.add_argument("--runs-dir", default=DEFAULT_RUNS_DIR, help="folder that contains the run folders")

    demo_parser = commands.add_parser(
        "make-demo", formatter_class=formatter, parents=[common], allow_abbrev=False,
        help="write a generated demo dataset of coloured shapes",
        description="Write a small dataset in the COMP5329 layout: images of shapes, labels = the shapes "
                    "present, template captions that name some of them.")
    demo_parser.add_argument("dir", help="folder to write (new, empty or an earlier demo dataset)")
    demo_parser.add_argument("--train-rows", type=int, default=600, help="labelled rows in train.csv")
    demo_parser.add_argument("--test-rows", type=int, default=100, help="rows in test.csv")
    demo_parser.add_argument("--image-size", type=int, default=96, help="image side in pixels")
    demo_parser.add_argument("--seed", type=int, default=0, help="random seed")
    return parser


# ----------------------------------------------------------------------------- commands


def _out(text: str = "") -> None:
    sys.stdout.write(text + "\n")


def _given_train_options(argv: list[str]) -> list[str]:
    """Return the training options present in `argv`, whatever their values, as flags."""
    # Every TrainConfig field has the option --field-name, and booleans also --no-field-name.
    names = [item.name.replace("_", "-") for item in fields(TrainConfig) if item.name != "runs_dir"]
    flags = {f"--{name}" for name in names} | {f"--no-{name}" for name in names}
    return [token.split("=", 1)[0] for token in argv if token.split("=", 1)[0] in flags]


def command_train(args: argparse.Namespace) -> int:
    if args.resume is not None:
        given = _given_train_options(args.argv)
        if given:
            raise ValueError(f"--resume continues a run with its own settings; drop {', '.join(given)}")
        run_dir = resolve_run(args.resume, args.runs_dir)
        config = checks_log = None
    else:
        names = {item.name for item in fields(TrainConfig)}
        config = TrainConfig(**{key: value for key, value in vars(args).items() if key in names})
        # The data checks log before the run folder exists, so their lines are kept for train.log.
        checks_log = logging.handlers.MemoryHandler(capacity=1_000_000, flushLevel=logging.CRITICAL + 1)
        logging.getLogger().addHandler(checks_log)
        try:
            run_dir, checked = create_run(config)
        finally:
            logging.getLogger().removeHandler(checks_log)
    handler = logging.FileHandler(run_dir / "train.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    if checks_log is not None:
        checks_log.setTarget(handler)
        checks_log.close()  # writes the kept lines to train.log
    logging.getLogger().addHandler(handler)
    _out(f"run folder: {run_dir}")
    try:
        if config is None:
            resume(run_dir)
        else:
            train(config, run_dir, checked)
    except (RunInUseError, CannotResumeError) as error:
        logger.error("cannot %s run %s: %s", "resume" if config is None else "train", run_dir.name, error)
        return 1
    except USER_ERRORS as error:
        logger.error("run %s failed: %s", run_dir.name, describe_error(error))
        if isinstance(error, FloatingPointError) and (run_dir / "last.pt").is_file():
            logger.error("last.pt and best.pt keep the weights of the last good epoch")
        elif (run_dir / "split.json").is_file():
            logger.error("after fixing the cause, continue with: python -m core train --resume %s", run_dir)
        return 1
    except KeyboardInterrupt:
        hint = f"; continue it with: python -m core train --resume {run_dir}" if (run_dir / "split.json").is_file() else ""
        logger.error("run %s interrupted by the user%s", run_dir.name, hint)
        return 130
    except Exception:
        logger.exception("run %s failed with an unexpected error", run_dir.name)
        raise
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()

    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    _out(f"best epoch {metrics['best_epoch']}: validation samples F1 {metrics['samples_f1_score']:.4f}, "
         f"micro F1 {metrics['micro_f1_score']:.4f}, macro F1 {metrics['macro_f1_score']:.4f} "
         f"(threshold {metrics['threshold']:.2f})")
    if "tuned" in metrics:
        _out(f"with per-label thresholds tuned on the same validation rows: samples F1 "
             f"{metrics['tuned']['samples_f1_score']:.4f}")
    _out(f"saved to {run_dir}")
    return 0


def command_evaluate(args: argparse.Namespace) -> int:
    from core.predict import evaluate_run

    run_dir = resolve_run(args.run, args.runs_dir)
    result = evaluate_run(run_dir, args.csv, args.images, args.checkpoint)
    if args.json:
        _out(json.dumps(result, indent=2))
        return 0
    _out(f"{run_dir.name} ({args.checkpoint} checkpoint, epoch {result['epoch']}) on {result['source']}, "
         f"{result['rows']} rows")
    _out(f"samples F1 {result['samples_f1_score']:.4f}   micro F1 {result['micro_f1_score']:.4f}   "
         f"macro F1 {result['macro_f1_score']:.4f}   (threshold {result['threshold']:.2f})")
    if result["tuned"] is not None:
        _out(f"with the run's tuned thresholds: samples F1 {result['tuned']['samples_f1_score']:.4f}")
    if result["unknown_labels"]:
        _out(f"left out of the scores, because the run never saw them: labels "
             f"{', '.join(map(str, result['unknown_labels']))}")
    _out()
    _out(f"{'label':>6}  {'name':<16} {'precision':>9} {'recall':>7} {'F1':>7} {'support':>8}")
    for row in result["per_label"]:
        _out(f"{row['label']:>6}  {row['name'][:16]:<16} {row['precision_score']:>9.3f} {row['recall_score']:>7.3f} "
             f"{row['f1_score']:>7.3f} {row['support']:>8}")
    return 0


def command_predict(args: argparse.Namespace) -> int:
    from core.predict import Predictor

    run_dir = resolve_run(args.run, args.runs_dir)
    predictor = Predictor(run_dir, args.checkpoint)
    if predictor.uses_images and not args.image:
        raise ValueError(f"run {run_dir.name} ({predictor.config['model']}) needs an image; pass --image PATH")
    if args.image and not Path(args.image).is_file():
        raise FileNotFoundError(f"image {args.image} not found")
    if args.top is not None and args.top < 1:
        raise ValueError(f"invalid --top {args.top}; expected 1 or more labels")
    if predictor.config["captions"] and not args.caption.strip():
        logger.warning("no --caption given; the model sees an empty caption")
    scores = predictor.predict(args.image if predictor.uses_images else None, args.caption)
    if args.top is not None:
        scores = scores[: args.top]
    if args.json:
        _out(json.dumps([vars(score) for score in scores], indent=2))
        return 0
    predicted = [score.name for score in scores if score.predicted]
    _out(f"predicted: {', '.join(predicted)}")
    _out(f"{'label':>6}  {'name':<16} {'probability':>11} {'threshold':>9}  predicted")
    for score in scores:
        mark = ""
        if score.predicted:
            # The most probable label is always predicted, even below its threshold.
            mark = "yes" if score.probability >= score.threshold else "yes (top label)"
        _out(f"{score.label:>6}  {score.name[:16]:<16} {score.probability:>11.3f} {score.threshold:>9.2f}  {mark}")
    return 0


def command_submit(args: argparse.Namespace) -> int:
    from core.predict import write_submission

    run_dir = resolve_run(args.run, args.runs_dir)
    rows = write_submission(run_dir, args.data, args.out, args.checkpoint)
    _out(f"wrote {rows} rows to {args.out}")
    return 0


def command_runs(args: argparse.Namespace) -> int:
    runs = list_runs(args.runs_dir)
    if args.json:
        _out(json.dumps([{**vars(run), "path": str(run.path)} for run in runs], indent=2))
        return 0
    if not runs:
        _out(f"no runs in {args.runs_dir}; start one with 'python -m core train'")
        return 0
    _out(f"{'run':<36} {'model':<18} {'captions':<8} {'status':<11} {'epochs':>7} {'samples F1':>10} "
         f"{'micro F1':>8} {'macro F1':>8}")
    for run in runs:
        best = run.best_metrics
        scores = [best.get(key) for key in ("samples_f1_score", "micro_f1_score", "macro_f1_score")]
        shown = [f"{score:.4f}" if isinstance(score, float) else "-" for score in scores]
        _out(f"{run.name[:36]:<36} {run.model:<18} {'yes' if run.captions else 'no':<8} {run.status:<11} "
             f"{run.epochs_done:>3}/{run.epochs_planned:<3} {shown[0]:>10} {shown[1]:>8} {shown[2]:>8}")
    return 0


def command_queue(args: argparse.Namespace) -> int:
    from core.jobs import work_queue

    count = work_queue(args.runs_dir)
    _out(f"ran {count} queued job(s)")
    return 0


def command_make_demo(args: argparse.Namespace) -> int:
    from core.demo import make_demo

    root = make_demo(args.dir, args.train_rows, args.test_rows, args.image_size, args.seed)
    _out(f"wrote demo dataset to {root}: {args.train_rows} training rows, {args.test_rows} test rows")
    return 0


COMMANDS = {
    "train": command_train,
    "evaluate": command_evaluate,
    "predict": command_predict,
    "submit": command_submit,
    "runs": command_runs,
    "queue": command_queue,
    "make-demo": command_make_demo,
}


def main(argv: list[str] | None = None) -> int:
    if hasattr(signal, "SIGPIPE") and threading.current_thread() is threading.main_thread():
        # Exit quietly when the reader of stdout goes away ("python -m core runs | head").
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # --resume checks which options were given, whatever their values
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format=LOG_FORMAT, stream=sys.stderr)
    try:
        return COMMANDS[args.command](args)
    except USER_ERRORS as error:
        logger.error("%s", describe_error(error))
        return 1
    except KeyboardInterrupt:
        logger.error("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
