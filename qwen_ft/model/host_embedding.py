"""The frozen input embedding of a LoRA run, kept in host memory: lookups only, made where the batch is.

A LoRA run never trains the input embedding, and the forward pass only looks rows up in it: 1.16 GiB of a
7B model's bf16 weights that the GPU holds for a gather. `model.host_embedding: true` moves the table to
host memory (pinned on a CUDA machine), and the collated micro-batch gets its rows there (`inputs_embeds`,
[rows, length, hidden], 16 MiB for 2048 tokens of a 7B model), which the loop copies to the device with
the rest of the batch, without blocking. The model then runs from `inputs_embeds`, which is what its
embedding would have produced, bit for bit (tests/integration/test_host_embedding.py: the same losses and
adapter weights step by step).

Not for an output layer tied to the embedding (it needs the table on the device), a trained embedding, a
composite (vision-language) checkpoint, preference objectives or ZeRO-3: refused by the config checks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class HostEmbedding:
    """The embedding table in host memory and its lookup."""

    def __init__(self, weight: torch.Tensor):
        table = weight.detach().to("cpu")
        self.weight = table.pin_memory() if torch.cuda.is_available() else table
        self.pinned = self.weight.is_pinned()

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """The rows of `ids` (a host tensor), in pinned memory where the table is, so the copy can overlap."""
        if not self.pinned:
            return F.embedding(ids, self.weight)
        out = torch.empty((*ids.shape, self.weight.shape[1]), dtype=self.weight.dtype, pin_memory=True)
        return torch.index_select(self.weight, 0, ids.reshape(-1), out=out.view(-1, self.weight.shape[1])).view(
            out.shape
        )


def move_embedding_to_host(model) -> HostEmbedding:
    """Take `model`'s input embedding table off its device: the embedding module keeps an empty weight, which
    nothing reads (the model runs from inputs_embeds)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    embedding = base.get_input_embeddings()
    host = HostEmbedding(embedding.weight)
    embedding.weight = torch.nn.Parameter(embedding.weight.new_empty((0, embedding.weight.shape[1])), False)
    return host
