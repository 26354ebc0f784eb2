"""Stub of Forge's ``backend/args.py``: parsed flags and the UI's dynamic args."""
import types

args = types.SimpleNamespace(disable_gpu_warning=True, always_cpu=True)
dynamic_args = {"forge_unet_storage_dtype": None, "online_lora": False, "embedding_dir": None, "emphasis_name": None}
