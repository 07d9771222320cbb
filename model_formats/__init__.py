"""Model-file formats shared by every family: safetensors reading and writing, tokenizers built
offline, single-file helpers and the demo-model builder. Nothing here knows a family by name."""
