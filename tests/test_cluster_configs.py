"""The cluster files (cluster/) stay runnable: the launcher config passes Ray's own validation, the
RayJob has what evomerge relies on, the example study loads, the GPU counts agree, and every `evomerge`
command in the docs parses with evomerge's real argument parser."""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from collections.abc import Iterator
from itertools import takewhile
from pathlib import Path

import yaml

from evomerge.cli import _parser
from evomerge.config import load_config

CLUSTER = Path(__file__).resolve().parent.parent / "cluster"
DOCS = sorted(CLUSTER.glob("*.md"))
SHELL_SEPARATORS = {";", "&&", "||", "|", "&", ")"}


def launcher() -> dict:
    return yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())


def k8s_docs() -> dict[str, dict]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all((CLUSTER / "rayjob.yaml").read_text()) if doc}


def study():
    return load_config(CLUSTER / "study.yaml")


def subcommands() -> set[str]:
    parser = _parser()
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return set(sub.choices)


def parse(argv: list[str]) -> str | None:
    """None when evomerge's parser accepts `argv`, else its error message."""
    return parse_args(argv)[1]


def parse_args(argv: list[str]) -> tuple[argparse.Namespace | None, str | None]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            return _parser().parse_args(argv), None
        except SystemExit as exc:
            return None, (err.getvalue().strip().splitlines() or [f"exit {exc.code}"])[-1]


# --- the Ray cluster launcher -------------------------------------------------------------------


def test_launcher_config_passes_ray_validation() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(launcher()))  # what `ray up` runs first; raises on a bad key


def test_launcher_has_a_gpu_worker_type_and_installs_evomerge() -> None:
    cfg = launcher()
    types = cfg["available_node_types"]
    gpu = [t for name, t in types.items() if name != cfg["head_node_type"] and t["resources"].get("GPU", 0) >= 1]
    assert gpu, "no worker node type with a GPU resource"
    assert gpu[0]["min_workers"] >= 1 and gpu[0]["max_workers"] >= gpu[0]["min_workers"]
    assert types[cfg["head_node_type"]]["resources"].get("CPU") == 0, "worker actors must not land on the head"
    setup = "\n".join(cfg["setup_commands"])
    assert re.search(r"pip install .*torch .*download\.pytorch\.org/whl/cu\d+", setup), "no CUDA torch install"
    assert re.search(r"pip install .*-e .*evomerge\[postgres\]", setup), "evomerge (editable, with postgres) not installed"
    assert "." in cfg["file_mounts"].values(), "the repository is not copied to the nodes"


def test_ray_versions_agree_with_the_installed_ray() -> None:
    import ray

    image = launcher()["docker"]["image"]
    rayjob = k8s_docs()["RayJob"]
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    wanted = ray.__version__
    assert image.startswith(f"rayproject/ray:{wanted}-"), f"cluster/ray-cluster.yaml image {image}: use Ray {wanted}"
    assert rayjob["spec"]["rayClusterSpec"]["rayVersion"] == wanted, f"cluster/rayjob.yaml rayVersion: use {wanted}"
    assert f"FROM rayproject/ray:{wanted}-" in dockerfile, f"cluster/Dockerfile FROM: use Ray {wanted}"


# --- KubeRay ------------------------------------------------------------------------------------


def test_rayjob_runs_evomerge_search_on_gpu_workers() -> None:
    rayjob = k8s_docs()["RayJob"]
    assert rayjob["apiVersion"] == "ray.io/v1"
    entrypoint = rayjob["spec"]["entrypoint"]
    assert entrypoint.startswith("evomerge search ")
    argv = shlex.split(entrypoint)[1:]
    assert parse(argv) is None, parse(argv)
    cluster = rayjob["spec"]["rayClusterSpec"]
    [group] = cluster["workerGroupSpecs"]
    [worker] = group["template"]["spec"]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_rayjob_mounts_the_study_config_and_reads_the_url_from_a_secret() -> None:
    spec = k8s_docs()["RayJob"]["spec"]
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    [container] = head["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert "secretKeyRef" in env["EVOMERGE_STORAGE"]["valueFrom"]
    assert '"$EVOMERGE_STORAGE"' in spec["entrypoint"]
    assert spec["submissionMode"] == "HTTPMode", "the head's shell must expand $EVOMERGE_STORAGE (see rayjob.yaml)"
    config_path = Path(shlex.split(spec["entrypoint"])[2])
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in head["volumes"]}
    [name] = [n for n, v in volumes.items() if "configMap" in v]
    assert config_path.parent == Path(mounts[name])
    assert {"key": "study.yaml", "path": config_path.name} in volumes[name]["configMap"]["items"]


def test_gpu_counts_agree_with_the_example_study() -> None:
    cfg = study()
    assert cfg.workers.gpus_per_worker == 1, "explicit, so actors ask for GPUs before autoscaled nodes are up"
    types = launcher()["available_node_types"]
    launcher_gpus = sum(t["min_workers"] * t["resources"].get("GPU", 0) for t in types.values() if "min_workers" in t)
    [group] = k8s_docs()["RayJob"]["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert launcher_gpus == cfg.workers.n == group["replicas"] == group["minReplicas"]


# --- evomerge commands in the docs --------------------------------------------------------------


def doc_commands(text: str) -> Iterator[list[str]]:
    """argv (after `evomerge`) of every evomerge command in sh blocks, YAML entrypoints and inline code."""
    for lang, block in re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.M | re.S):
        if lang in ("sh", "bash", "shell", "console"):
            for line in block.replace("\\\n", " ").splitlines():
                yield from invocations(line)
        elif lang == "yaml":
            for value in re.findall(r"^\s*entrypoint:\s*(.+)$", block, flags=re.M):
                yield from invocations(value)
    for span in re.findall(r"(?<!`)`(evomerge [^`\n]+)`", text):
        yield from invocations(span)


def invocations(text: str) -> Iterator[list[str]]:
    if "evomerge" not in text:
        return
    tokens = shlex.split(text, comments=True)
    for i, token in enumerate(tokens):
        if token == "evomerge":
            yield list(takewhile(lambda t: t not in SHELL_SEPARATORS, tokens[i + 1 :]))
        elif "evomerge " in token:  # a quoted command: ray exec '...', sh -c '...'
            yield from invocations(token)


def all_doc_commands() -> list[tuple[str, list[str]]]:
    return [(doc.name, argv) for doc in DOCS for argv in doc_commands(doc.read_text())]


def test_docs_show_the_whole_workflow() -> None:
    used = {argv[0] for _, argv in all_doc_commands() if argv}
    assert {"search", "status", "dashboard", "resume", "export"} <= used


def test_doc_commands_use_subcommands_evomerge_has() -> None:
    known = subcommands()
    manifest = k8s_docs()["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    used = [(doc, argv) for doc, argv in all_doc_commands()] + [("rayjob.yaml Deployment", manifest["args"])]
    missing = sorted({argv[0] for _, argv in used if argv and argv[0] not in known})
    assert not missing, f"evomerge subcommands used in cluster/ but missing from evomerge.cli: {', '.join(missing)}"


def test_doc_commands_parse() -> None:
    known = subcommands()
    manifest = k8s_docs()["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert manifest["command"] == ["evomerge"]
    used = all_doc_commands() + [("rayjob.yaml Deployment", manifest["args"])]
    failures = [f"{doc}: evomerge {shlex.join(argv)}: {parse(argv)}" for doc, argv in used
                if argv and argv[0] in known and parse(argv) is not None]
    assert not failures, "\n".join(failures)
    assert len(used) >= 10


def test_doc_commands_name_the_example_study() -> None:
    name = study().name
    named = 0
    for doc, argv in all_doc_commands():
        args, _ = parse_args(argv) if argv and argv[0] in subcommands() else (None, None)
        if getattr(args, "study", None) is not None:
            named += 1
            assert args.study == name, f"{doc}: evomerge {shlex.join(argv)}: not the example study {name!r}"
    assert named >= 5


def test_command_extraction_finds_quoted_and_chained_commands() -> None:
    text = "```sh\nray exec c.yaml 'evomerge status --storage \"$X\" s' && evomerge export s \\\n  --out d # note\n```\n"
    assert list(doc_commands(text)) == [["status", "--storage", "$X", "s"], ["export", "s", "--out", "d"]]
    assert parse(["no-such-command"]) is not None
