"""Hugging Face interop: local config.json + *.safetensors directories <-> growlm params.

  hf_layout.py  pure descriptions of the GPT-2 and Llama tensor and config layouts
  hf.py         the codec: read, check, import and export directories (numpy, no torch)
"""
