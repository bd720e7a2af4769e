from pathlib import Path

import pytest

from evomerge.models.checkpoints import Checkpoint
from evomerge.errors import ModelError
from evomerge.models.layout import LayerGroups, group_of_each, layer_index, num_layers, tensor_kind
from tiny_models import save_tiny


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gpt2"])
def test_layers_found_from_real_checkpoints(tmp_path: Path, family: str) -> None:
    ckpt = Checkpoint.open(str(save_tiny(tmp_path / family, family)))
    assert num_layers(ckpt.config) == 4
    layers = {layer_index(n) for n in ckpt.names} - {None}
    assert layers == {0, 1, 2, 3}
    groups = group_of_each(ckpt.names, LayerGroups(4, 2))
    by_group = {g: [n for n, gg in groups.items() if gg == g] for g in (0, 1)}
    assert any(".0." in n for n in by_group[0]) and not any(".3." in n for n in by_group[0])
    assert any(".3." in n for n in by_group[1])


def test_non_layer_tensors_go_to_the_nearest_group() -> None:
    groups = LayerGroups(4, 2)
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight", "transformer.wte.weight",
             "transformer.ln_f.weight", "model.layers.3.mlp.down_proj.weight"]
    assert group_of_each(names, groups) == {
        "model.embed_tokens.weight": 0, "model.norm.weight": 1, "lm_head.weight": 1,
        "transformer.wte.weight": 0, "transformer.ln_f.weight": 1, "model.layers.3.mlp.down_proj.weight": 1,
    }


def test_group_sizes_are_near_equal() -> None:
    groups = LayerGroups(10, 3)
    sizes = [sum(groups.of_layer(i) == g for i in range(10)) for g in range(3)]
    assert sizes == [4, 3, 3]


def test_more_groups_than_layers_is_refused() -> None:
    with pytest.raises(ModelError, match="layer_groups = 5, but the model has 4 layers"):
        LayerGroups(4, 5)


@pytest.mark.parametrize("name,kind", [
    ("model.layers.0.self_attn.q_proj.weight", "attention"),
    ("model.layers.0.mlp.down_proj.weight", "mlp"),
    ("transformer.h.1.attn.c_attn.weight", "attention"),
    ("transformer.h.1.mlp.c_fc.bias", "mlp"),
    ("model.layers.0.input_layernorm.weight", "other"),
    ("model.embed_tokens.weight", "other"),
])
def test_tensor_kind(name: str, kind: str) -> None:
    assert tensor_kind(name) == kind
