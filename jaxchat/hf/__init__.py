"""Hugging Face interop: models to and from transformers, and the Hub.

The command is `python -m jaxchat.hf` (`__main__`); the library modules never import it:
- `convert`: a jaxchat checkpoint as a transformers NanoChat model directory, and such a directory (or nanochat's own
  checkpoint files) as a jaxchat checkpoint; `download_model` for `--repo`
- `tokenizer`: jaxchat's tokenizer as tokenizer.json with its chat template, and back
- `safetensors`: reading and writing the weights' file format
- `nanochat_checkpoint`: nanochat's model_<step>.pt, meta_<step>.json and tokenizer.pkl, read without torch
- `hub`: the Hub through huggingface_hub and its cache (models, and the task datasets' parquet export)
"""
