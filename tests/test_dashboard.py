"""optuna-dashboard support: artifact folders, recipe artifacts and the study note, read back over the
dashboard's own HTTP API from a real server started with `run_dashboard` in a subprocess."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import yaml

from evomerge.config import parse_config
from evomerge.study.dashboard import artifact_dir_for, redact, study_note, upload_recipe_artifact, write_study_note
from evomerge.errors import StudyError
from evomerge.study import StudyStore

requests = pytest.importorskip("requests")

GENE = "g0.weight.a"
RECIPE = {"method": "ties", "base": "/m/base", "sources": ["/m/a"], "groups": [{"weight": [0.3]}]}


def make_store(url: str, name: str = "dash") -> StudyStore:
    cfg = parse_config({
        "name": name, "storage": url,
        "models": {"base": "/m/base", "sources": ["/m/a", "/m/b"]},
        "search_space": {"methods": ["ties"], "params": {"weight": {"low": 0, "high": 1}}},
        "evaluation": {"tasks": [{"name": "zoo_arith"}]},
    })
    return StudyStore.create(cfg, {GENE: 1.0})


def start(store: StudyStore, value: float, candidate: int) -> int:
    dists = {GENE: optuna.distributions.FloatDistribution(0, 1)}
    number, _ = store.start_trial({GENE: value}, dists, {"generation": 0, "candidate": candidate, "attempt": 0})
    store.set_recipe(number, RECIPE)
    return number


def test_artifact_dir_for_each_storage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EVOMERGE_ARTIFACTS", raising=False)
    assert artifact_dir_for(f"sqlite:///{tmp_path}/s.db") == tmp_path / "s.db.artifacts"
    assert artifact_dir_for(f"journal:///{tmp_path}/s.log") == tmp_path / "s.log.artifacts"
    assert artifact_dir_for("sqlite:///rel.db") == Path("rel.db.artifacts")
    with pytest.raises(StudyError, match=r"--artifacts DIR .*EVOMERGE_ARTIFACTS.*shared filesystem") as err:
        artifact_dir_for("postgresql://bob:s3cret@db:5432/evo")
    assert "s3cret" not in str(err.value) and "\n" not in str(err.value)
    assert artifact_dir_for("postgresql://bob@db/evo", "/shared/art") == Path("/shared/art")
    monkeypatch.setenv("EVOMERGE_ARTIFACTS", str(tmp_path / "env"))
    assert artifact_dir_for("mysql://db/evo") == tmp_path / "env"


def test_note_has_summary_and_exact_commands() -> None:
    store_yaml = yaml.safe_dump({
        "models": {"base": "org/base", "sources": ["org/math", "org/code"]},
        "search_space": {"kind": "parameter", "methods": ["ties"], "layer_groups": 2, "params": {"density": {"low": 0.1, "high": 1.0}}},
        "evaluation": {"tasks": [{"name": "gsm8k", "metric": "exact_match", "weight": 2.0}]},
        "optimizer": {"kind": "cmaes", "popsize": 16}, "budget": {"trials": 128}, "workers": {"n": 8},
    })
    note = study_note(store_yaml, "postgresql://bob:s3cret@db:5432/evo", "my study")
    for part in ("org/math", "ties", "density [0.1, 1.0]", "gsm8k (exact_match, weight 2.0)", "population 16", "128 trials on 8 workers",
                 "evomerge resume 'my study' --storage 'postgresql://bob:***@db:5432/evo'",
                 "evomerge export 'my study' --storage 'postgresql://bob:***@db:5432/evo' --out DIR",
                 "evomerge status --storage 'postgresql://bob:***@db:5432/evo' 'my study'"):
        assert part in note, part
    assert "s3cret" not in note
    assert redact("sqlite:///x.db") == "sqlite:///x.db"


def test_recipe_artifact_goes_to_the_study_once_the_trial_finished(tmp_path: Path) -> None:
    store = make_store(f"sqlite:///{tmp_path}/s.db")
    n = start(store, 0.5, 0)
    store.finish_trial(n, 0.5, {})
    art = tmp_path / "art"
    artifact_id = upload_recipe_artifact(store.study, n, "method: ties\n", art)
    assert (art / artifact_id).read_text() == "method: ties\n"
    metas = optuna.artifacts.get_all_artifact_meta(store.study)
    assert [m.filename for m in metas] == [f"recipe-trial{n}.yaml"]
    with pytest.raises(StudyError, match="no trial 99"):
        upload_recipe_artifact(store.study, 99, "x", art)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, StudyStore, Path]]:
    """A small study (one trial done, with its recipe artifact and the note) served by `run_dashboard`
    in a subprocess; one server for the module, since starting one costs seconds."""
    folder = tmp_path_factory.mktemp("served")
    url = f"sqlite:///{folder}/study.db"
    store = make_store(url)
    art = artifact_dir_for(url)
    write_study_note(store.study, store.study.user_attrs["evomerge.config"], url, "dash")
    done = start(store, 0.3, 0)
    upload_recipe_artifact(store.study, store._running[done], yaml.safe_dump(RECIPE), art)
    store.finish_trial(done, 0.5, {"scores.fitness": {"zoo_arith": 0.5}})
    port = free_port()
    code = f"from evomerge.study.dashboard import run_dashboard; run_dashboard({url!r}, port={port})"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "EVOMERGE_ARTIFACTS": ""})
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(base, proc)
        yield base, store, art
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_until_up(base: str, proc: subprocess.Popen, timeout_s: float = 60) -> None:
    """Poll until the server answers (on a busy machine it may take a while to start, and to answer)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"dashboard exited with {proc.returncode}: {proc.stdout.read()}")
        try:
            if requests.get(f"{base}/api/meta", timeout=5).ok:
                return
        except (requests.ConnectionError, requests.Timeout):  # not listening yet, or slow to answer
            pass
        time.sleep(0.2)
    pytest.fail(f"dashboard not up at {base} after {timeout_s} s")


def test_dashboard_serves_scores_recipe_and_note(served: tuple[str, StudyStore, Path]) -> None:
    base, store, _ = served
    studies = requests.get(f"{base}/api/studies", timeout=5).json()["study_summaries"]
    assert [s["study_name"] for s in studies] == ["dash"]
    study_id = studies[0]["study_id"]
    detail = requests.get(f"{base}/api/studies/{study_id}", timeout=5).json()
    [done] = [t for t in detail["trials"] if t["number"] == 0]
    attrs = {a["key"]: a["value"] for a in done["user_attrs"]}
    assert json.loads(attrs["scores.fitness"]) == {"zoo_arith": 0.5}
    [artifact] = done["artifacts"]
    assert artifact["filename"] == f"recipe-trial{done['number']}.yaml"
    got = requests.get(f"{base}/artifacts/{study_id}/{done['trial_id']}/{artifact['artifact_id']}", timeout=5)
    assert got.status_code == 200 and yaml.safe_load(got.text) == RECIPE
    assert "evomerge resume dash --storage sqlite:///" in detail["note"]["body"]


def test_trial_failed_in_the_dashboard_does_not_break_the_writer(served: tuple[str, StudyStore, Path]) -> None:
    base, store, art = served
    number = start(store, 0.7, 1)
    running = store.study.trials[number]
    assert running.state == optuna.trial.TrialState.RUNNING
    told = requests.post(f"{base}/api/trials/{running._trial_id}/tell", json={"state": "Fail"}, timeout=5)
    assert told.status_code == 204
    assert store.finish_trial(number, 0.9, {"scores.fitness": {"zoo_arith": 0.9}}) is False
    assert store.study.trials[number].state == optuna.trial.TrialState.FAIL
    artifact_id = upload_recipe_artifact(store.study, number, "late: true\n", art)  # goes to the study
    assert (art / artifact_id).read_text() == "late: true\n"
    study_artifacts = [m.filename for m in optuna.artifacts.get_all_artifact_meta(store.study)]
    assert study_artifacts == [f"recipe-trial{number}.yaml"]
