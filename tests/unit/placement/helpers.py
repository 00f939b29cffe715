"""Small builders for synthetic models, so split and choice tests state their numbers directly."""

from __future__ import annotations

from collections.abc import Sequence

from orchestrator.model.meta import Footprint, ModelFile, ModelMeta


def synthetic_meta(layer_bytes: Sequence[int], shared: int = 0, *,
                   bits: int | None = None, packed_share: float = 0.0,
                   source: str = "synthetic") -> ModelMeta:
    """A model with the given layer sizes, one file per layer plus one shared file."""
    layers = tuple(Footprint(b, b, int(b * packed_share)) for b in layer_bytes)
    files = (ModelFile("shared.safetensors", shared, (), True),
             *(ModelFile(f"layer-{i}.safetensors", b, (i,), False)
               for i, b in enumerate(layer_bytes)))
    return ModelMeta(source=source, model_type="synthetic", num_layers=len(layer_bytes),
                     layers=layers, shared=Footprint(shared, shared, int(shared * packed_share)),
                     unused_bytes=0, files=files, num_parameters=sum(layer_bytes) + shared,
                     bits=bits)
