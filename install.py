"""Run by the webui at launch (not with --skip-install / --skip-prepare-environment).

Installs only what ColorizeDiffusion needs and the webui may lack, and only when it is missing. Never touches
the packages the webui pins (torch, torchvision, gradio, numpy, open-clip-torch, ...): an upgrade there would
break the webui.
"""
import launch

# (module to import, pip requirement, why)
REQUIREMENTS = (
    ("cv2", "opencv-python-headless", "line extraction (normally present through facexlib)"),
    ("safetensors", "safetensors", "reading the sketch encoder from the checkpoint"),
    ("huggingface_hub", "huggingface_hub", "downloading line-extractor weights"),
)

NEVER_INSTALL = {"torch", "torchvision", "gradio", "numpy", "open-clip-torch", "open_clip_torch"}

for module, requirement, why in REQUIREMENTS:
    if requirement in NEVER_INSTALL:
        continue
    if not launch.is_installed(module):
        launch.run_pip(f"install {requirement}", f"{requirement} for ColorizeDiffusion ({why})")
