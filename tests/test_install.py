"""scripts/check_install.py, the README's install check: it passes on this install and fails in one line on a
torch/torchvision pair that does not work together (simulated: a torchvision whose import raises what a
mismatched pair raises)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "check_install.py")


def run(env=None):
    env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, SCRIPT], capture_output=True, text=True, env=env)


def test_check_install_passes_and_names_the_build():
    out = run()
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("torch ") and "torchvision " in out.stdout and "device: " in out.stdout


def test_check_install_fails_in_one_line_on_a_mismatched_pair(tmp_path):
    fake = tmp_path / "torchvision"
    fake.mkdir()
    (fake / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    out = run({"PYTHONPATH": str(tmp_path)})
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1 and "torchvision does not work with torch" in out.stderr
    assert "operator torchvision::nms does not exist" in out.stderr and out.stdout == ""
