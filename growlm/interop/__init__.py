"""Hugging Face interop: local config.json + *.safetensors directories <-> growlm params.

  hf_families.py  config.json <-> ModelConfig for GPT-2, Llama, Qwen2 and Mistral (and refusals)
  hf_layout.py    tensor names and shapes of each family <-> growlm leaves
  hf.py           the codec: read, check, import and export directories (numpy, no torch)
"""
