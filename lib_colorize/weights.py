"""Where the released ColorizeDiffusion checkpoints come from, and how a name becomes a local file."""
from __future__ import annotations

import os
from pathlib import Path

from .errors import InvalidInput, MissingWeights

#: Released checkpoint files (method §1.3): file name -> Hugging Face repository.
RELEASED_CHECKPOINTS: dict[str, str] = {
    "mult-ft.safetensors": "tellurion/colorizer",
    "mult-newft.safetensors": "tellurion/colorizer",
    "mult-eps-ft.safetensors": "tellurion/ColorizeDiffusion",
    "mult-eps-newft.safetensors": "tellurion/ColorizeDiffusion",
    "switch-eps.safetensors": "tellurion/ColorizeDiffusion",
    "v2-full.safetensors": "tellurion/ColorizeDiffusion",
}


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_checkpoint(name_or_path: str, models_dir: "str | os.PathLike[str]", allow_download: bool = True) -> str:
    """A checkpoint path: an existing file as given, else a released name found in (or downloaded into)
    ``<models_dir>/Stable-diffusion``. Names are looked up in :data:`RELEASED_CHECKPOINTS`, never joined
    blindly onto paths."""
    if os.path.isfile(name_or_path):
        return os.fspath(name_or_path)
    name = os.path.basename(str(name_or_path))
    if not name.endswith(".safetensors"):
        name += ".safetensors"
    if name not in RELEASED_CHECKPOINTS:
        raise InvalidInput("checkpoint", f"{name_or_path} is neither a file nor a released checkpoint name "
                                         f"({', '.join(n[:-12] for n in RELEASED_CHECKPOINTS)})")
    folder = Path(models_dir) / "Stable-diffusion"
    local = folder / name
    if local.is_file():
        return os.fspath(local)
    repo = RELEASED_CHECKPOINTS[name]
    url = f"https://huggingface.co/{repo}/blob/main/{name}"
    if not allow_download or _offline():
        raise MissingWeights(f"ColorizeDiffusion: checkpoint {name} is not in {folder} and downloads are off; "
                             f"download it from {url} and put it there")
    try:
        import huggingface_hub

        folder.mkdir(parents=True, exist_ok=True)
        return huggingface_hub.hf_hub_download(repo, name, local_dir=os.fspath(folder))  # shows a progress bar
    except Exception as error:  # network, auth, disk: the user's fix is the same
        raise MissingWeights(f"ColorizeDiffusion: could not download {name} ({type(error).__name__}: {error}); "
                             f"download it from {url} and put it in {folder}") from None
