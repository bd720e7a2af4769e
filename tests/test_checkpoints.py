import json
from pathlib import Path

import pytest
import torch

from evomerge.models.checkpoints import Checkpoint, check_mergeable, resolve_model, write_checkpoint
from evomerge.errors import ModelError
from tiny_models import save_tiny


def test_sharded_write_reads_back(tmp_path: Path) -> None:
    src = Checkpoint.open(str(save_tiny(tmp_path / "m", "llama")))
    out = tmp_path / "out"
    out.mkdir()
    files = write_checkpoint(((n, src.tensor(n)) for n in src.names), out, config=src.config,
                             side_files_from=src.path, max_shard_bytes=20_000)
    assert len(files) > 1
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(src.names)
    back = Checkpoint.open(str(out))
    assert all(torch.equal(back.tensor(n), src.tensor(n)) for n in src.names)
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(out)  # loads with plain transformers


def test_mismatched_sources_are_named(tmp_path: Path) -> None:
    base = Checkpoint.open(str(save_tiny(tmp_path / "base", "llama")))
    wide = Checkpoint.open(str(save_tiny(tmp_path / "wide", "llama", intermediate_size=96)))
    other = Checkpoint.open(str(save_tiny(tmp_path / "gpt2", "gpt2")))
    with pytest.raises(ModelError, match=r"model 'wide': tensor '.*mlp.*' has shape \[32, 96\], the base has \[32, 64\]"):
        check_mergeable(base, [("wide", wide)])
    with pytest.raises(ModelError, match=r"model 'gpt2' lacks '.*' \(\d+ tensor names differ from the base\)"):
        check_mergeable(base, [("gpt2", other)])


def test_pickled_weights_need_opt_in(tmp_path: Path) -> None:
    folder = save_tiny(tmp_path / "m", "llama")
    state = {n: Checkpoint.open(str(folder)).tensor(n) for n in Checkpoint.open(str(folder)).names}
    for f in folder.glob("*.safetensors"):
        f.unlink()
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(ModelError, match="pickled"):
        Checkpoint.open(str(folder))
    assert Checkpoint.open(str(folder), allow_pickle=True).names == list(state)


def test_missing_model_and_hub_id_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ModelError, match="no such folder"):
        resolve_model(str(tmp_path / "nope"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelError, match="not a local folder and not available from the Hub"):
        resolve_model("org/missing-model")


def test_hub_id_resolves_from_the_offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Hub id laid out as huggingface_hub's cache resolves with HF_HUB_OFFLINE=1."""
    hub = tmp_path / "hf" / "hub"
    snap = hub / "models--org--tiny" / "snapshots" / "abc123"
    save_tiny(snap, "llama")
    (hub / "models--org--tiny" / "refs").mkdir(parents=True)
    (hub / "models--org--tiny" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    assert resolve_model("org/tiny") == snap
    assert Checkpoint.open("org/tiny").names
