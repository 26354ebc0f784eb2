"""Stand-in ``modules.paths``; tests point ``models_path`` at a temporary folder."""
import os
import tempfile

script_path = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
data_path = os.environ.get("CD_STANDIN_DATA", os.path.join(tempfile.gettempdir(), "cd-standin-data"))
models_path = os.path.join(data_path, "models")
extensions_dir = os.path.join(data_path, "extensions")
