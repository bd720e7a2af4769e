"""Models on disk and in memory: checkpoints, their layout, and candidates built from recipes.

    headers.py     what a checkpoint holds, from its headers (no torch: the controller reads these)
    layout.py      layers, layer groups and tensor kinds from tensor names (no torch)
    checkpoints.py reading tensors lazily, writing sharded safetensors
    vocab.py       the merged vocabulary: embeddings and head laid out by token (mergekit's tokenizer settings)
    build.py       a recipe's merged tensors, one tensor at a time (shared by workers and export)
    live.py        building a candidate into a live model in memory, one builder per recipe kind
    path_model.py  data-flow path models over resident layers
"""
