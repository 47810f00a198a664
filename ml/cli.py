"""`python -m ml <command>`: every pipeline stage runnable by hand.

The commands call the same functions as the Airflow DAG's tasks. Object-store credentials
come from `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY` and `ML_S3_ENDPOINT_URL`; when those are
unset and the demo's store is running (`make up`), the demo store is used.

Exit codes: 0 success, 1 a failed check or gate (e.g. `validate` found failing expectations),
2 unusable input or configuration.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ml.config import REPO_ROOT, PipelineConfig, overrides_from_params
from ml.errors import ConfigError, DataError, DataQualityError, MLError, StorageError
from ml.io import read_json

if TYPE_CHECKING:
    from ml.registry.store import ObjectStore

log = logging.getLogger("ml.cli")

DEMO_STORE_STATE = REPO_ROOT / ".demo" / "seaweed" / "state.json"


def _print_json(obj: Any) -> None:
    from ml.io import to_jsonable

    print(json.dumps(to_jsonable(obj), indent=2, sort_keys=True))


def _config(args: argparse.Namespace, **params: Any) -> PipelineConfig:
    return PipelineConfig.load(getattr(args, "config", None), overrides=overrides_from_params(params))


def open_store(config: PipelineConfig) -> ObjectStore:
    """The configured store; falls back to the running demo store when no credentials are set."""
    from ml.registry.store import store_from_credentials

    if not os.environ.get("AWS_ACCESS_KEY_ID") and DEMO_STORE_STATE.exists():
        state = read_json(DEMO_STORE_STATE)
        log.info("no AWS_ACCESS_KEY_ID set: using the demo object store at %s", state["endpoint_url"])
        return store_from_credentials(config.storage, login=state["access_key"], password=state["secret_key"],
                                      extra={"endpoint_url": state["endpoint_url"]})
    return store_from_credentials(config.storage)


def _arg(check):
    """An argparse `type=` from a layout check: a bad value is a usage error naming the rule (exit 2)."""
    from ml.errors import UnsafeNameError

    def parse(value: str) -> str:
        try:
            return check(value)
        except UnsafeNameError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = check.__name__.removeprefix("check_").replace("_", " ")
    return parse


def _run_id_arg(value: str) -> str:
    from ml.registry.layout import check_run_id

    return _arg(check_run_id)(value)


def _version_arg(value: str) -> str:
    from ml.registry.layout import check_version

    return _arg(check_version)(value)


def _candidate_arg(value: str) -> str:
    from ml.errors import UnknownArchitectureError
    from ml.registry.layout import check_candidate

    try:
        return _arg(check_candidate)(value)
    except UnknownArchitectureError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# --------------------------------------------------------------------------- commands


def cmd_sample(args: argparse.Namespace) -> int:
    from ml.data.sample import make_sample_dataset

    _print_json(make_sample_dataset(Path(args.dest), classes=args.classes, per_class=args.per_class,
                                    size=args.size, seed=args.seed, layout=args.layout))
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from ml.pipeline import ingest_stage

    config = _config(args)
    if args.dest:
        config = PipelineConfig.from_dict({**config.to_dict(), "work_dir": args.dest})
    store = open_store(config) if args.source.startswith("s3://") else None
    creds = None
    if os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"):
        creds = (os.environ["KAGGLE_USERNAME"], os.environ["KAGGLE_KEY"])
    _print_json(ingest_stage(config, store, source=args.source, kaggle_credentials=creds))
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from ml.data.quality import validate_dataset

    config = _config(args)
    dataset = Path(args.dataset)
    if not (dataset / "manifest.parquet").exists():
        raise DataError(f"{dataset} is not a dataset folder (no manifest.parquet); run `python -m ml ingest` first")
    report = validate_dataset(dataset, config.data, out_dir=Path(args.out) if args.out else None)
    print(report.summary())
    return 0 if report.success else 1


def cmd_train(args: argparse.Namespace) -> int:
    from ml.registry.runs import cache_root
    from ml.training.fit import train_candidate

    config = _config(args, epochs=args.epochs, image_size=args.image_size, weights=args.weights)
    summary = train_candidate(Path(args.dataset), args.candidate, Path(args.out), config.train,
                              cache_root=cache_root(config), store=None)
    _print_json(summary)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ml.pipeline import evaluate_stage
    from ml.registry.layout import check_candidate
    from ml.registry.runs import local_run_dir

    config = _config(args)
    results = []
    for cand_dir in map(Path, args.candidate_dirs):
        summary = read_json(cand_dir / "train_summary.json")
        check_candidate(summary.get("candidate"))  # it names a folder below
        # Evaluate in place: the run folder links to the candidate folder, where metrics and plots go.
        link = local_run_dir(config, args.run_id) / summary["candidate"]
        if link.resolve() != cand_dir.resolve():
            if link.exists() and not link.is_symlink():
                raise ConfigError(f"{link} already holds another {summary['candidate']}; pass another --run-id")
            link.parent.mkdir(parents=True, exist_ok=True)
            link.unlink(missing_ok=True)
            link.symlink_to(cand_dir.resolve(), target_is_directory=True)
        results.append(summary)

    evaluation = evaluate_stage(Path(args.dataset), results, config, None, args.run_id)
    _print_json({"best": evaluation["best"], "leaderboard": evaluation["leaderboard"]})
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """The whole pipeline in this process, without Airflow (same stage functions)."""
    from ml.pipeline import (
        evaluate_stage,
        finetune_stage,
        gate_stage,
        ingest_stage,
        prepare_stage,
        promote_stage,
        search_stage,
        select_for_finetuning,
        should_train,
        train_stage,
        validate_stage,
    )
    from ml.registry.runs import new_run_id

    config = _config(args, source=args.source, candidates=args.candidates, epochs=args.epochs,
                     image_size=args.image_size, weights=args.weights, min_delta=args.min_delta, force=args.force,
                     search=args.search)
    store = open_store(config)
    store.ensure_bucket()
    run_id = args.run_id or new_run_id()
    dataset = ingest_stage(config, store)
    quality = validate_stage(dataset, config, store, run_id)
    verdict = should_train(dataset, config, store, run_id)
    if not verdict["train"]:
        print(f"skipped: {verdict['reason']}")
        return 0
    prepare_stage(dataset, config)
    results = [train_stage(dataset, c, config, store, run_id) for c in config.train.trained_candidates]
    results += [finetune_stage(dataset, c, config, store, run_id)
                for c in select_for_finetuning(results, config)]
    # The search block's trials, rung after rung (the DAG maps each rung over its trials).
    results += search_stage(dataset, config, store, run_id)
    evaluation = evaluate_stage(dataset, results, config, store, run_id)
    decision = gate_stage(dataset, evaluation, config, store, run_id)
    result = promote_stage(dataset, evaluation, decision, config, store, run_id, actor="cli", quality=quality)
    _say_if_approval_blocked(result)
    _print_json(result)
    return 0


def _say_if_approval_blocked(result: dict[str, Any]) -> None:
    """A command-line run has nobody to approve: when approval is required, say plainly why production stayed."""
    if ((result.get("decision") or {}).get("approval") or {}).get("outcome") == "not asked":
        print(f"production kept ({result.get('version') or 'no production model'}): the gate would promote "
              f"{result['decision'].get('challenger')}, but gate.require_approval is on and a command-line run "
              "has nobody to approve it. Trigger the image_classifier_retraining DAG to ask a reviewer, or set "
              "gate.require_approval: false.", file=sys.stderr)


def cmd_promote(args: argparse.Namespace) -> int:
    """Gate a run's evaluated best candidate against production and promote it if it wins."""
    from ml.pipeline import gate_stage, promote_stage
    from ml.registry.runs import local_run_dir

    config = _config(args, min_delta=args.min_delta, force=args.force)
    store = open_store(config)
    run_dir = local_run_dir(config, args.run_id)
    dataset = read_json(Path(args.dataset) / "dataset.json")
    dataset["dataset_dir"] = str(Path(args.dataset))
    evaluation = read_json(run_dir / "leaderboard" / "leaderboard.json")
    rows = evaluation if isinstance(evaluation, list) else evaluation.get("rows", evaluation)
    evaluation = {"leaderboard": rows, "best": args.candidate or rows[0]["candidate"], "production": None}
    decision = gate_stage(args.dataset, evaluation, config, store, args.run_id)
    result = promote_stage(dataset, evaluation, decision, config, store, args.run_id, actor="cli")
    _say_if_approval_blocked(result)
    _print_json(result)
    return 0 if result["promoted"] else 1


def cmd_versions(args: argparse.Namespace) -> int:
    from ml.registry.versions import list_versions, promotion_history

    config = _config(args)
    store = open_store(config)
    versions = list_versions(store, config.storage.model_name)
    if args.json:
        _print_json({"versions": versions, "history": promotion_history(store, config.storage.model_name)})
        return 0
    if not versions:
        print(f"no versions of {config.storage.model_name} in {store.uri('')}")
        return 0
    print(f"{'':2}{'version':28} {'candidate':26} {'accuracy':>9} {'log loss':>9}  created")
    for v in versions:
        metrics = v.get("metrics") or {}
        mark = "* " if v.get("is_production") else "  "
        acc = metrics.get("accuracy")
        loss = metrics.get("log_loss")
        print(f"{mark}{v['version']:28} {str(v.get('candidate', '')):26} "
              f"{acc if acc is None else format(acc, '.3f'):>9} {loss if loss is None else format(loss, '.3f'):>9}"
              f"  {v.get('created_at', '')}")
    print("* = production")
    history = promotion_history(store, config.storage.model_name)
    if history:
        print("\npromotion log:")
        for entry in history[-args.history:]:
            print(f"  {entry.get('at', '')}  {entry.get('action', ''):8} {entry.get('from')} -> {entry.get('to')}"
                  f"  ({entry.get('run_id', '')}): {'; '.join(entry.get('reasons', []))[:160]}")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from ml.registry.versions import rollback

    config = _config(args)
    store = open_store(config)
    _print_json(rollback(store, config.storage.model_name, args.to, reason=args.reason,
                         actor=os.environ.get("USER", "cli")))
    return 0


def cmd_retention(args: argparse.Namespace) -> int:
    """Remove old runs' artifacts (and, if asked, never-promoted versions); production stays."""
    from ml.registry.retention import apply_retention

    config = _config(args)
    store = open_store(config)
    _print_json(apply_retention(store, config.storage.model_name, keep_runs=args.keep_runs,
                                dry_run=args.dry_run, prune_versions=args.prune_versions))
    return 0


def cmd_ensure_bucket(args: argparse.Namespace) -> int:
    """Create the configured bucket unless it exists (idempotent); print its URI.

    Credentials come from the environment only (`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`), so a
    deployment's init step passes no secret on a command line.
    """
    config = _config(args)
    store = open_store(config)
    try:
        store.ensure_bucket()
    except StorageError as exc:
        raise StorageError(f"cannot create or reach bucket {config.storage.bucket!r}: {exc}") from None
    print(store.uri(""))
    return 0


def _predictor(model: str, config: PipelineConfig, runtime: str):
    from ml.registry.layout import check_version
    from ml.serving.predictor import load_local, load_production, load_version

    cache_dir = config.work_dir / "models"
    if model != "production" and Path(model).exists():
        return load_local(Path(model), runtime=runtime)
    store = open_store(config)
    if model == "production":
        return load_production(store, config.storage.model_name, cache_dir=cache_dir, runtime=runtime)
    # Not a file here: a version id, checked before it names a cache folder or a key.
    return load_version(store, config.storage.model_name, check_version(model), cache_dir=cache_dir,
                        runtime=runtime)


def cmd_predict(args: argparse.Namespace) -> int:
    config = _config(args)
    predictor = _predictor(args.model, config, args.runtime)
    missing = [p for p in args.images if not Path(p).is_file()]
    if missing:
        raise DataError(f"no such image file: {', '.join(missing)}")
    predictions = predictor.predict([Path(p) for p in args.images], top_k=args.top_k)
    pairs = zip(args.images, predictions, strict=True)
    _print_json({"model": getattr(predictor, "version", args.model),
                 "predictions": [{"image": p, "top_k": preds} for p, preds in pairs]})
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from ml.serving.submission import write_submission

    config = _config(args)
    predictor = _predictor(args.model, config, args.runtime)
    out = write_submission(predictor, Path(args.dataset), Path(args.out),
                           sample_submission=Path(args.sample) if args.sample else None)
    print(f"wrote {out['rows']} predictions for {out['classes']} classes to {args.out}")
    return 0


# --------------------------------------------------------------------------- parser
def _runtime_argument(parser: argparse.ArgumentParser) -> None:
    from ml.serving.runtimes import COMPILED, RUNTIMES

    parser.add_argument("--runtime", choices=RUNTIMES, default=COMPILED,
                        help="how the model runs: compiled (tf.function, default) or tflite (the version's "
                             "model.tflite)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ml", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="pipeline YAML (default: $ML_CONFIG or config/pipeline.yaml)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("sample", help="make a sample dataset offline (JPEGs)")
    p.add_argument("--dest", required=True, help="folder to create")
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--per-class", type=int, default=60)
    p.add_argument("--size", type=int, default=96, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layout", choices=("kaggle", "folders"), default="kaggle")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("ingest", help="a folder, .zip, s3:// or kaggle: source -> dataset with manifest")
    p.add_argument("--source", required=True)
    p.add_argument("--dest", help="work folder (datasets go to DEST/datasets/<hash>/); default: work_dir")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("validate", help="data-quality suite (exit 0 pass, 1 failing expectations, 2 bad input)")
    p.add_argument("--dataset", required=True, help="dataset folder (holds manifest.parquet)")
    p.add_argument("--out", help="write quality.json and quality.html here")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("train", help="train one candidate into a folder")
    p.add_argument("--dataset", required=True)
    p.add_argument("--candidate", required=True, type=_candidate_arg, help="e.g. scratch_small, transfer_mobilenet_v2")
    p.add_argument("--out", required=True)
    p.add_argument("--epochs", type=int)
    p.add_argument("--image-size", type=int)
    p.add_argument("--weights", help="imagenet | none | weights file | s3:// URI")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="score trained candidate folders on the test split; leaderboard")
    p.add_argument("--dataset", required=True)
    p.add_argument("--run-id", default="manual", type=_run_id_arg)
    p.add_argument("candidate_dirs", nargs="+", metavar="CANDIDATE_DIR")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("promote", help="gate an evaluated run's best candidate against production; promote")
    p.add_argument("--dataset", required=True)
    p.add_argument("--run-id", default="manual", type=_run_id_arg)
    p.add_argument("--candidate", type=_candidate_arg, help="default: the leaderboard's best")
    p.add_argument("--min-delta", type=float)
    p.add_argument("--force", action="store_true", default=None)
    p.set_defaults(func=cmd_promote)

    p = sub.add_parser("run", help="the whole pipeline in this process, without Airflow")
    p.add_argument("--source")
    p.add_argument("--candidates", nargs="+")
    p.add_argument("--epochs", type=int)
    p.add_argument("--image-size", type=int)
    p.add_argument("--weights")
    p.add_argument("--min-delta", type=float)
    p.add_argument("--force", action="store_true", default=None)
    p.add_argument("--search", action=argparse.BooleanOptionalAction, default=None,
                   help="run the config's search block (default: search.enabled)")
    p.add_argument("--run-id", type=_run_id_arg)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("versions", help="list versions, production and the promotion log")
    p.add_argument("--json", action="store_true")
    p.add_argument("--history", type=int, default=10, help="promotion log entries to show")
    p.set_defaults(func=cmd_versions)

    p = sub.add_parser("rollback", help="point production back at an earlier version (conditional write)")
    p.add_argument("--to", required=True, metavar="VERSION", type=_version_arg)
    p.add_argument("--reason", default="manual rollback")
    p.set_defaults(func=cmd_rollback)

    p = sub.add_parser("retention", help="delete old runs' artifacts; never production or rollback targets")
    p.add_argument("--keep-runs", type=int, required=True, metavar="N", help="keep the newest N runs (N >= 1)")
    p.add_argument("--dry-run", action="store_true", help="report what would be removed, delete nothing")
    p.add_argument("--prune-versions", action="store_true",
                   help="also delete versions never in production (older than a day)")
    p.set_defaults(func=cmd_retention)

    p = sub.add_parser("ensure-bucket", help="create the configured bucket unless it exists; print its URI "
                                             "(credentials from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)")
    p.set_defaults(func=cmd_ensure_bucket)

    p = sub.add_parser("predict", help="top-k labels for images")
    p.add_argument("--model", default="production", help="production, a version id, or a model.keras path")
    p.add_argument("--top-k", type=int, default=5)
    _runtime_argument(p)
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("submit", help="Kaggle submission CSV for a dataset's unlabelled test images")
    p.add_argument("--dataset", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="production")
    p.add_argument("--sample", help="Kaggle's sample_submission.csv: column and row order "
                                    "(default: DATASET/sample_submission.csv if present, else sorted labels)")
    _runtime_argument(p)
    p.set_defaults(func=cmd_submit)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return int(args.func(args) or 0)
    except DataQualityError as exc:
        print(f"data-quality check failed: {exc}", file=sys.stderr)
        for failure in exc.failures:
            print(f"  - {failure}", file=sys.stderr)
        return 1
    except (ConfigError, DataError, StorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except MLError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `python -m ml ... | head`
        sys.stderr.close()
        return 0
