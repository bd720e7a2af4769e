"""Exports: a trial (or any recipe) as a Hugging Face checkpoint, a model card, or a mergekit YAML.

    checkpoint.py    export_trial / write_recipe_checkpoint: weights, recipe.yaml, card, mergekit.yaml
    card.py          the model card
    mergekit.py      recipes to and from mergekit-yaml configs
    path.py          a data-flow path as a standard checkpoint of its family
    trial_models.py  trials of other studies (PS+DFS) and LoRA sources as models, cached as checkpoints
    lora.py          MODEL+ADAPTER: a LoRA applied to its model (peft's arithmetic), written once to a cache
"""

from evomerge.export.card import model_card
from evomerge.export.checkpoint import (
    Exported,
    check_out_dir,
    export_mergekit,
    export_trial,
    mergekit_target,
    mergekit_text_of,
    write_recipe_checkpoint,
)

__all__ = ["Exported", "check_out_dir", "export_mergekit", "export_trial", "mergekit_target", "mergekit_text_of",
           "model_card", "write_recipe_checkpoint"]
