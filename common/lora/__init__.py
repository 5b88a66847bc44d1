"""LoRA adapters applied per request, with the maths of diffusers' `load_lora_weights` + `set_adapters`.

* `files`: one adapter file -> `Adapter` (diffusers/PEFT keys and the community formats diffusers converts
  for these pipelines, through the pipelines' own `lora_state_dict`), checked against the loaded transformer;
* `registry`: a read-only `--lora-dir` (NAME.safetensors, optional NAME.json request defaults) and the LRU of
  loaded adapters, bounded in bytes;
* `merge`: a set of (adapter, scale) merged into the transformer's weights for a run and restored exactly
  from a copy of the touched weights (nothing stays merged once a request without that set runs).
"""

from imagegen.common.lora.files import Adapter, AdapterError, read_adapter
from imagegen.common.lora.merge import AdapterSlot
from imagegen.common.lora.registry import AdapterCache, LoraDefaults, LoraRegistry

__all__ = [
    "Adapter",
    "AdapterCache",
    "AdapterError",
    "AdapterSlot",
    "LoraDefaults",
    "LoraRegistry",
    "read_adapter",
]
