"""Names are validated where they are read: config, command line, Airflow run ids and store listings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ml.config import PipelineConfig
from ml.errors import ConfigError, DataError, UnsafeNameError
from ml.registry import layout
from ml.registry.store import ObjectStore

MODEL = "image-classifier"
RUN = "manual__2026-11-23T17:05:01.123456+00:00"


def _config(tmp_path: Path, store: ObjectStore | None = None, **sections) -> PipelineConfig:
    raw = {"work_dir": str(tmp_path / "work"), **sections}
    if store is not None:
        raw["storage"] = {"bucket": store.bucket, "endpoint_url": store.endpoint_url}
    return PipelineConfig.from_dict(raw)


def test_a_candidate_path_in_the_config_is_refused_before_any_folder_is_touched(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("precious")

    with pytest.raises(ConfigError, match="train.candidates: invalid candidate name"):
        _config(tmp_path, train={"candidates": ["scratch_a/../../../victim"]})
    with pytest.raises(ConfigError, match="known"):
        _config(tmp_path, train={"candidates": ["scratch_nonexistent"]})
    with pytest.raises(ConfigError, match="candidate_options"):
        _config(tmp_path, train={"candidate_options": {"transfer_../x": {}}})
    assert (victim / "keep.txt").read_text() == "precious"


def test_train_stage_checks_the_candidate_it_is_handed(tmp_path: Path) -> None:
    """XCom or the CLI can hand a stage any string: the stage checks it before _fresh_dir."""
    from ml.pipeline import train_stage
    from ml.registry.runs import local_run_dir

    config = _config(tmp_path)
    victim = local_run_dir(config, RUN).parent / "victim"
    victim.mkdir(parents=True)
    (victim / "keep.txt").write_text("precious")

    with pytest.raises(UnsafeNameError):
        train_stage(tmp_path / "no-dataset", "../victim", config, None, RUN)
    assert (victim / "keep.txt").read_text() == "precious"


def test_run_folders_use_the_reversible_segment(tmp_path: Path) -> None:
    from ml.registry.runs import local_run_dir, run_key

    config = _config(tmp_path)
    a, b = "manual__2026-11-23T17:05:01+00:00", "manual__2026-11-23T17_05_01_00_00"

    assert local_run_dir(config, a) != local_run_dir(config, b)
    assert run_key(config, a) != run_key(config, b)
    assert layout.run_id_from_segment(local_run_dir(config, a).name) == a


def test_crafted_keys_under_a_candidate_are_refused_before_download(store: ObjectStore, tmp_path: Path) -> None:
    from ml.registry.runs import ensure_candidate_local

    config = _config(tmp_path, store)
    prefix = layout.candidate_prefix(MODEL, RUN, "scratch_small")
    store.put_json(prefix + "train_summary.json", {"candidate": "scratch_small"})
    store.put_bytes(prefix + ".hidden/escaped.txt", b"owned")  # a name the pipeline never writes

    with pytest.raises(UnsafeNameError, match="file of candidate scratch_small"):
        ensure_candidate_local(store, config, RUN, "scratch_small")
    assert [p for p in (tmp_path / "work").rglob("*") if p.is_file()] == []


def test_a_marker_that_names_another_candidate_is_refused(store: ObjectStore, tmp_path: Path) -> None:
    from ml.registry.runs import published_candidates

    config = _config(tmp_path, store)
    store.put_json(layout.candidate_prefix(MODEL, RUN, "scratch_small") + "train_summary.json",
                   {"candidate": "scratch_tiny"})

    with pytest.raises(DataError, match="does not describe candidate 'scratch_small'"):
        published_candidates(config, store, RUN)


@pytest.mark.parametrize("argv, message", [
    (["rollback", "--to", "../../x"], "invalid version id"),
    (["evaluate", "--dataset", "d", "--run-id", "a\nb", "c"], "invalid run id"),
    (["train", "--dataset", "d", "--candidate", "scratch_a/../../v", "--out", "o"], "invalid candidate name"),
])
def test_cli_refuses_unsafe_names_as_usage_errors(argv: list[str], message: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from ml.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)

    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_predict_refuses_a_version_that_is_a_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from ml import cli

    monkeypatch.setenv("ML_WORK_DIR", str(tmp_path))
    monkeypatch.setattr(cli, "open_store", lambda config: None)
    image = tmp_path / "x.jpg"
    image.write_bytes(b"")

    assert cli.main(["predict", "--model", "../../../tmp/nothing-here", str(image)]) == 2
    assert "invalid version id" in capsys.readouterr().err


# -- the registry pages link runs by their segment -------------------------------------------------


def test_registry_links_work_for_real_airflow_run_ids(store: ObjectStore) -> None:
    from ml.registry import browser
    from ml.registry.versions import append_promotion_log

    store.put_json(f"{layout.run_prefix(MODEL, RUN)}/report.json",
                   {"run_id": RUN, "decision": {"promoted": False, "reasons": ["kept"]}, "leaderboard": []})
    append_promotion_log(store, MODEL, {"action": "keep", "version": "none", "run_id": RUN, "reasons": ["kept"]})

    page = browser.render_overview(store, MODEL, base_url="/model-registry")
    href = browser.run_href("/model-registry", RUN)

    assert href is not None and page.count(f"href='{href}'") == 2  # gate decisions and runs list
    segment = href.rsplit("/", 1)[1]
    run_page = browser.render_run(store, MODEL, segment, base_url="/model-registry")
    assert f"Run {RUN}" in run_page and "No report" not in run_page
    assert browser.list_runs(store, MODEL) == [RUN]


@pytest.mark.parametrize("path", ["runs/../production.json", "runs/a~zz/report.html", "versions/../x/model_card.html",
                                  "runs/r/.hidden.html", "runs/r", "production.json"])
def test_artifact_paths_are_checked_segment_by_segment(store: ObjectStore, path: str) -> None:
    from ml.registry import browser

    with pytest.raises(PermissionError):
        browser.read_artifact(store, MODEL, path)


def test_a_crafted_run_folder_is_not_listed(store: ObjectStore) -> None:
    from ml.registry import browser

    store.put_json(f"{MODEL}/runs/a~zz/report.json", {})

    assert browser.list_runs(store, MODEL) == []


# -- what a trigger may read -----------------------------------------------------------------------


def test_allowed_sources_are_prefixes_and_local_paths_are_resolved(tmp_path: Path) -> None:
    allowed = tmp_path / "datasets"
    (allowed / "dogs").mkdir(parents=True)
    security = {"allowed_sources": [str(allowed), "s3://ml-data/", "kaggle:competitions/"]}

    for ok in (str(allowed / "dogs"), "s3://ml-data/dogs/", "kaggle:competitions/dog-breed-identification"):
        assert _config(tmp_path, data={"source": ok}, security=security).data.source == ok
    for bad in (str(allowed / ".." / "secrets"), "/etc", "s3://other-bucket/x", "s3://ml-data/../other",
                "kaggle:datasets/someone/else", str(tmp_path / "datasets-evil")):
        with pytest.raises(ConfigError, match="security.allowed_sources"):
            _config(tmp_path, data={"source": bad}, security=security)


def test_a_symlink_out_of_an_allowed_folder_is_refused(tmp_path: Path) -> None:
    allowed = tmp_path / "datasets"
    allowed.mkdir()
    (allowed / "escape").symlink_to("/etc")

    with pytest.raises(ConfigError, match="security.allowed_sources"):
        _config(tmp_path, data={"source": str(allowed / "escape")},
                security={"allowed_sources": [str(allowed)]})


def test_trigger_params_cannot_slip_past_the_allow_list(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ml.config import overrides_from_params

    config_file = tmp_path / "pipeline.yaml"
    config_file.write_text(json.dumps({"security": {"allowed_sources": ["s3://ml-data/"],
                                                    "allowed_weights": ["imagenet", "s3://ml-weights/"]}}))

    with pytest.raises(ConfigError, match="allowed_sources"):
        PipelineConfig.load(config_file, overrides=overrides_from_params({"source": "/etc"}))
    with pytest.raises(ConfigError, match="allowed_weights"):
        PipelineConfig.load(config_file, overrides=overrides_from_params({"weights": "/root/.ssh/id_rsa.h5"}))
    ok = PipelineConfig.load(config_file, overrides=overrides_from_params({"weights": "ImageNet"}))
    assert ok.train.weights == "ImageNet"


def test_ingest_stage_checks_an_explicit_source(tmp_path: Path) -> None:
    from ml.pipeline import ingest_stage

    config = _config(tmp_path, security={"allowed_sources": ["s3://ml-data/"]})

    with pytest.raises(ConfigError, match="allowed_sources"):
        ingest_stage(config, None, source=str(tmp_path))
