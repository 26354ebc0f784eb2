"""Smoke test of the XL memory bench (``python -m bench.xl_memory --quick``): both runs complete in their own
processes and report every stage. The figures of tiny files mean nothing and are not asserted."""
from __future__ import annotations

import io
import json
import os

from bench import xl_memory


def test_quick_xl_memory_bench_reports_both_runs(monkeypatch):
    monkeypatch.setenv("BENCH_THREADS", "1")
    out = io.StringIO()
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        checkpoint, models = xl_memory._tiny_files(folder)
        figures = xl_memory.run(checkpoint, models, 64, "float32", tiny=True, out=out)
    text = out.getvalue()
    assert json.loads(text.strip().splitlines()[-1]) == figures
    assert "| staged | reference encoded (before the U-Net; encoders dropped after) |" in text
    assert "| resident | models and encoders loaded |" in text
    assert figures["staged_peak_rss_gib"] > 0 and figures["peak_rss_ratio_staged"] > 0
    assert os.path.basename(checkpoint) in text
