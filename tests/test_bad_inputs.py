"""Every bad input of issue 14 is refused up front: exit code 2, exactly one line on stderr starting with
"evomerge: ", nothing written or deleted under the test's folder, and Ray never started.

One table, one row per case; each row's setup builds what the case needs (a study, a broken model copy)
before the folder is snapshotted, and returns the command line. Cases where work has already started
(a full disk mid-search, every candidate failing the same way) follow the table: they run the real
controller loop on `fake_pool.FakePool` and check what the study keeps instead.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
import yaml

import evomerge.search.run
import evomerge.study.storage
from evomerge.cli import main
from evomerge.config import load_config
from evomerge.models.headers import read_safetensors_index
from evomerge.recipe import Recipe
from evomerge.runtime.messages import JobFailure
from evomerge.study import StudyStore
from evomerge.study.lease import LEASE_ATTR
from fake_pool import fake_ray  # noqa: F401 (fixture)
from study_configs import zoo_config

RUNNING, COMPLETE = optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.COMPLETE
UNREACHABLE_PG = "postgresql://evomerge:s3cret@127.0.0.1:1/evomerge"


@pytest.fixture(autouse=True)
def _ray_must_not_start(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started although the input is bad")

    monkeypatch.setattr(evomerge.search.run, "start_ray", refuse)


@dataclass
class Env:
    tmp: Path
    zoo: object
    monkeypatch: pytest.MonkeyPatch

    @property
    def url(self) -> str:
        return f"sqlite:///{self.tmp / 'study.db'}"

    def config(self, change: Callable[[dict], None] = lambda d: None, **kwargs) -> str:
        path = zoo_config(self.zoo, self.tmp, **kwargs)
        data = yaml.safe_load(path.read_text())
        change(data)
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return str(path)

    def task(self, **changes) -> Callable[[dict], None]:
        return lambda d: d["evaluation"]["tasks"][0].update(changes)

    def copy_model(self, which: str, name: str) -> Path:
        source = self.zoo.base if which == "base" else self.zoo.specialists[which]
        return Path(shutil.copytree(source, self.tmp / name))

    def study(self, *, completed: bool = True, url: str | None = None) -> StudyStore:
        """A study 's' with one completed trial whose recipe is a real merge of the zoo."""
        cfg = load_config(zoo_config(self.zoo, self.tmp, name="s", storage=url or self.url))
        store = StudyStore.create(cfg, {"w": 0.5})
        if completed:
            recipe = Recipe("linear", str(self.zoo.base), tuple(str(p) for p in self.zoo.specialists.values()),
                            ({"weight": (0.5, 0.5)},))
            dist = {"w": optuna.distributions.FloatDistribution(0, 1)}
            number, _ = store.start_trial({"w": 0.5}, dist, {"generation": 0, "candidate": 0, "attempt": 0})
            store.set_recipe(number, recipe.to_dict())
            store.finish_trial(number, 0.5, {"scores.fitness": {"zoo_arith": 0.5, "zoo_rev": 0.5}})
        return store


def sharded(env: Env, which: str, name: str, *, keep_index: bool) -> Path:
    """A copy of a zoo model split into two shards, with the second shard deleted (and its index kept or not)."""
    from safetensors.numpy import load_file, save_file

    folder = env.copy_model(which, name)
    tensors = load_file(folder / "model.safetensors")
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2], "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for shard, members in halves.items():
        save_file({n: tensors[n] for n in members}, folder / shard)
    (folder / "model.safetensors").unlink()
    if keep_index:
        weight_map = {n: shard for shard, members in halves.items() for n in members}
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "model-00002-of-00002.safetensors").unlink()
    return folder


def with_nan(env: Env, which: str, name: str) -> tuple[Path, str]:
    """A copy of a zoo model whose first tensor holds one NaN (written into the file's bytes)."""
    folder = env.copy_model(which, name)
    file = folder / "model.safetensors"
    tensor, (dtype, _, (start, _)) = next(iter(read_safetensors_index(file).items()))
    assert dtype == "F32"
    with open(file, "r+b") as handle:
        handle.seek(start)
        handle.write(b"\x00\x00\xc0\x7f")  # float32 NaN
    return folder, tensor


def swap_source(path: Path, index: int = 0) -> Callable[[dict], None]:
    def change(d: dict) -> None:
        d["models"]["sources"][index] = str(path)
    return change


def read_only(env: Env, path: Path) -> None:
    """Make `path` read-only; as root (whom permission bits do not bind) the storage check reads the bits."""
    path.chmod(0o555 if path.is_dir() else 0o444)
    env.monkeypatch.setattr(evomerge.study.storage, "_writable",
                            lambda p: os.access(p, os.W_OK) and (os.geteuid() != 0 or bool(p.stat().st_mode & 0o200)))


# --- the cases: setup(env) -> argv, and a piece of the expected message ---------------------------


def export_force_into_the_study_folder(env: Env) -> list[str]:
    env.study()
    return ["export", "s", "--storage", env.url, "--out", str(env.tmp), "--force"]


def export_force_into_the_artifacts(env: Env) -> list[str]:
    env.study()
    (env.tmp / "study.db.artifacts").mkdir()
    (env.tmp / "study.db.artifacts" / "a1").write_text("recipe")
    return ["export", "s", "--storage", env.url, "--out", str(env.tmp / "study.db.artifacts"), "--force"]


def export_force_onto_a_file(env: Env) -> list[str]:
    env.study()
    (env.tmp / "notes.txt").write_text("mine")
    return ["export", "s", "--storage", env.url, "--out", str(env.tmp / "notes.txt"), "--force"]


def export_force_over_other_files(env: Env) -> list[str]:
    env.study()
    (env.tmp / "out").mkdir()
    (env.tmp / "out" / "thesis.tex").write_text("mine")
    return ["export", "s", "--storage", env.url, "--out", str(env.tmp / "out"), "--force"]


def export_on_a_full_disk(env: Env) -> list[str]:
    env.study()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    env.monkeypatch.setattr(os, "pwrite", full)
    return ["export", "s", "--storage", env.url, "--out", str(env.tmp / "out")]


def missing_fitness_split(env: Env) -> list[str]:
    return ["search", env.config(env.task(fitness_split="validation"))]


def missing_heldout_split(env: Env) -> list[str]:
    return ["search", env.config(env.task(heldout_split="test"))]


def unknown_metric(env: Env) -> list[str]:
    return ["search", env.config(env.task(metric="exact_match"))]


def linear_weights_pinned_at_zero(env: Env) -> list[str]:
    space = {"methods": ["linear"], "params": {"weight": {"low": 0, "high": 0}}}
    return ["search", env.config(lambda d: d.update(search_space=space))]


def truncated_safetensors(env: Env) -> list[str]:
    folder = env.copy_model("arith", "truncated")
    file = folder / "model.safetensors"
    os.truncate(file, file.stat().st_size - 100)  # the header is intact, the data ends early
    return ["search", env.config(swap_source(folder))]


def shard_listed_but_missing(env: Env) -> list[str]:
    return ["search", env.config(swap_source(sharded(env, "arith", "sharded", keep_index=True)))]


def base_lacking_a_shard(env: Env) -> list[str]:
    base = sharded(env, "base", "base-without-index", keep_index=False)
    return ["search", env.config(lambda d: d["models"].update(base=str(base)))]


def malformed_config_json(env: Env) -> list[str]:
    folder = env.copy_model("rev", "bad-config")
    (folder / "config.json").write_text('{"model_type": "llama",')
    return ["search", env.config(swap_source(folder, 1))]


def search_on_unreachable_postgres(env: Env) -> list[str]:
    return ["search", env.config(storage=UNREACHABLE_PG)]


def search_on_malformed_postgres_url(env: Env) -> list[str]:
    return ["search", env.config(storage="postgresql://evomerge:s3cret@host:port/db")]


def status_on_unreachable_postgres(env: Env) -> list[str]:
    return ["status", "--storage", UNREACHABLE_PG]


def dashboard_on_unreachable_postgres(env: Env) -> list[str]:
    return ["dashboard", "--storage", UNREACHABLE_PG]


def sqlite_in_a_missing_folder(env: Env) -> list[str]:
    return ["search", env.config(storage=f"sqlite:///{env.tmp / 'nowhere' / 'study.db'}")]


def sqlite_in_a_read_only_folder(env: Env) -> list[str]:
    folder = env.tmp / "locked"
    folder.mkdir()
    read_only(env, folder)
    return ["search", env.config(storage=f"sqlite:///{folder / 'study.db'}")]


def read_only_sqlite_database(env: Env) -> list[str]:
    env.study(completed=False)
    read_only(env, env.tmp / "study.db")
    return ["search", env.config(name="another")]


def journal_in_a_missing_folder(env: Env) -> list[str]:
    return ["search", env.config(storage=f"journal:///{env.tmp / 'nowhere' / 'study.log'}")]


def dashboard_on_a_missing_journal(env: Env) -> list[str]:
    return ["dashboard", "--storage", f"journal:///{env.tmp / 'missing.log'}"]


def merge_malformed_yaml(env: Env) -> list[str]:
    (env.tmp / "recipe.yaml").write_text("method: linear\nsources: [a, b\n")
    return ["merge", str(env.tmp / "recipe.yaml"), "--out", str(env.tmp / "merged")]


def merge_a_source_with_nan(env: Env) -> list[str]:
    broken, _ = with_nan(env, "arith", "nan-source")
    recipe = Recipe("linear", str(env.zoo.base), (str(broken), str(env.zoo.specialists["rev"])), ({"weight": (0.5, 0.5)},))
    (env.tmp / "recipe.yaml").write_text(recipe.to_yaml())
    return ["merge", str(env.tmp / "recipe.yaml"), "--out", str(env.tmp / "merged")]


def resume_with_negative_trials(env: Env) -> list[str]:
    env.study()
    return ["resume", "s", "--storage", env.url, "--trials", "-5"]


def resume_while_another_controller_runs(env: Env) -> list[str]:
    store = env.study()
    now = time.time()
    store.study.set_user_attr(LEASE_ATTR, {"host": "node-7", "pid": 4242, "since": now - 30, "renewed": now,
                                           "ttl_s": 60.0, "token": "theirs"})
    return ["resume", "s", "--storage", env.url]


def delete_without_confirmation(env: Env) -> list[str]:
    env.study()
    return ["delete", "s", "--storage", env.url]


def demo_with_zero_trials(env: Env) -> list[str]:
    return ["demo", "--dir", str(env.tmp / "demo"), "--trials", "0"]


def demo_with_zero_workers(env: Env) -> list[str]:
    return ["demo", "--dir", str(env.tmp / "demo"), "--workers", "0"]


def demo_with_negative_trials(env: Env) -> list[str]:
    return ["demo", "--dir", str(env.tmp / "demo"), "--trials", "-1"]


CASES = [  # issue 14 item, setup, expected in the message
    (1, export_force_into_the_study_folder, "the study's storage or its artifacts"),
    (1, export_force_into_the_artifacts, "the study's storage or its artifacts"),
    (1, export_force_over_other_files, "holds 'thesis.tex'"),
    (6, export_force_onto_a_file, "is a file"),
    (5, export_on_a_full_disk, "No space left on device"),
    (3, missing_fitness_split, "has no split 'validation' (its splits: fitness, heldout)"),
    (3, missing_heldout_split, "has no split 'test'"),
    (4, unknown_metric, "does not report metric 'exact_match' (it reports: acc)"),
    (4, linear_weights_pinned_at_zero, "weight bounds {low: 0, high: 0} pin every model's weight to 0"),
    (3, truncated_safetensors, "truncated"),
    (9, shard_listed_but_missing, "shard model-00002-of-00002.safetensors is listed in model.safetensors.index.json but missing"),
    (9, base_lacking_a_shard, "the base model"),
    (5, malformed_config_json, "config.json is not valid JSON"),
    (5, search_on_unreachable_postgres, "cannot open it"),
    (5, search_on_malformed_postgres_url, "cannot open it"),
    (5, status_on_unreachable_postgres, "cannot open it"),
    (5, dashboard_on_unreachable_postgres, "cannot open it"),
    (5, sqlite_in_a_missing_folder, "does not exist; create it"),
    (5, sqlite_in_a_read_only_folder, "is not writable"),
    (5, read_only_sqlite_database, "is read-only"),
    (5, journal_in_a_missing_folder, "does not exist; create it"),
    (10, dashboard_on_a_missing_journal, "no such file"),
    (5, merge_malformed_yaml, "malformed YAML at line 3"),
    (5, merge_a_source_with_nan, "NaN or inf values, so every merge with it fails; the checkpoint is broken"),
    (7, resume_with_negative_trials, "--trials -5"),
    (2, resume_while_another_controller_runs, "being run by another controller (host node-7, pid 4242, since "),
    (3, delete_without_confirmation, "not deleted; answer y, or pass --yes"),
    (8, demo_with_zero_trials, "--trials 0"),
    (8, demo_with_zero_workers, "--workers 0"),
    (8, demo_with_negative_trials, "--trials -1"),
]


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under root with its size and modification time (folders: their names only)."""
    return {str(p.relative_to(root)): (None, None) if p.is_dir() else (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize(("item", "setup", "expected"), CASES, ids=[c[1].__name__ for c in CASES])
def test_refused_up_front(item: int, setup, expected: str, zoo_llama, tmp_path: Path, monkeypatch, capsys) -> None:
    argv = setup(Env(tmp_path, zoo_llama, monkeypatch))
    before = snapshot(tmp_path)
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.count("\n") == 0 and err.startswith("evomerge: "), err
    assert expected in err, err
    assert "s3cret" not in err  # a storage password is never printed
    assert snapshot(tmp_path) == before, "something was written or deleted"


# --- after work started: the controller loop on FakePool ----------------------------------------------


def trials_of(url: str, name: str = "t") -> list[optuna.trial.FrozenTrial]:
    return StudyStore.open(url, name).study.get_trials()


def test_a_full_disk_mid_search_is_one_line_and_keeps_completed_trials(zoo_llama, tmp_path, fake_ray, monkeypatch, capsys) -> None:
    env = Env(tmp_path, zoo_llama, monkeypatch)
    config = env.config(trials=8)
    real_upload, calls = evomerge.search.run.upload_recipe_artifact, []

    def upload(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "study.db.artifacts"))
        return real_upload(*args, **kwargs)

    monkeypatch.setattr(evomerge.search.run, "upload_recipe_artifact", upload)
    assert main(["search", config]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("evomerge: No space left on device: "), err
    trials = trials_of(env.url)
    assert [t.state for t in trials[:3]] == [COMPLETE] * 3  # no completed trial lost
    assert RUNNING not in {t.state for t in trials}  # the trial in flight was marked interrupted
    assert trials[3].user_attrs["fail_reason"].startswith("interrupted")


def failing_with(reason: Callable[[int], str]) -> Callable:
    def evaluate(pool, job):
        return JobFailure(reason(job.trial), worker_died=False)
    return evaluate


def test_candidates_failing_the_same_way_stop_the_search(zoo_llama, tmp_path, fake_ray, monkeypatch, capsys) -> None:
    env = Env(tmp_path, zoo_llama, monkeypatch)
    fake_ray.evaluate = failing_with(lambda n: f"KeyError: 'acc,none' (trial {n})")  # numbers aside, the same error
    assert main(["search", env.config(trials=16)]) == 2
    out, err = capsys.readouterr()
    assert err.strip().count("\n") == 0, err
    assert err.startswith("evomerge: the first 4 candidates all failed with the same error, so every candidate would: KeyError"), err
    assert "export it" not in out
    trials = trials_of(env.url)
    assert len(trials) <= 5 and RUNNING not in {t.state for t in trials}


def test_nan_in_a_source_is_named_as_the_checkpoints_fault(zoo_llama, tmp_path, fake_ray, monkeypatch, capsys) -> None:
    env = Env(tmp_path, zoo_llama, monkeypatch)
    broken, tensor = with_nan(env, "arith", "nan-source")
    # what models.build reports for a merged tensor with NaN in it
    fake_ray.evaluate = failing_with(lambda n: f"FloatingPointError: merged tensor {tensor!r}: {n + 3} merged values "
                                               "are NaN or inf; the recipe is degenerate")
    assert main(["search", env.config(swap_source(broken), trials=16)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"evomerge: model {str(broken)!r}: tensor {tensor!r} holds 1 NaN or inf values, so every merge with it "
                   "fails; the checkpoint is broken, not the recipe: re-save or re-download it")


def test_different_failures_run_on_and_end_without_an_export_line(zoo_llama, tmp_path, fake_ray, monkeypatch, capsys) -> None:
    env = Env(tmp_path, zoo_llama, monkeypatch)
    fake_ray.evaluate = failing_with(lambda n: ["RuntimeError: out of memory", "ValueError: bad shape"][n % 2])
    assert main(["search", env.config(trials=4)]) == 2
    out, err = capsys.readouterr()
    assert "best: none" in out and "export it" not in out
    assert err.strip().count("\n") == 0 and "no candidate of study 't' completed" in err


def test_one_success_disarms_the_stop(zoo_llama, tmp_path, fake_ray, monkeypatch, capsys) -> None:
    env = Env(tmp_path, zoo_llama, monkeypatch)
    fake_ray.evaluate = lambda pool, job: pool.score(job) if job.trial == 0 else JobFailure("RuntimeError: boom", False)
    assert main(["search", env.config(trials=4)]) == 0
    assert "export it" in capsys.readouterr().out


def test_status_of_a_missing_storage_creates_nothing(tmp_path, capsys) -> None:
    for url in (f"journal:///{tmp_path / 'missing.log'}", f"sqlite:///{tmp_path / 'missing.db'}"):
        assert main(["status", "--storage", url]) == 0
        assert main(["status", "--storage", url, "s"]) == 2
    assert list(tmp_path.iterdir()) == []
