"""Check the install: torch and torchvision import as a matching pair, and the runtime packages are there.

    python scripts/check_install.py

Prints one line (versions, CUDA or CPU build, the device training would use) and exits 0, or names
what is wrong in one line and exits 1. A torch and a torchvision from different indexes (a CPU torch beside
PyPI's CUDA torchvision, say) install without complaint but fail at `import torchvision` ("operator
torchvision::nms does not exist"): pip does not check that pair, so this does.
"""
import importlib
import sys

RUNTIME = ["safetensors", "huggingface_hub", "lpips", "yaml", "PIL", "numpy", "tqdm", "tensorboard"]


def main():
    try:
        import torch
    except Exception as e:
        return f"torch does not import ({type(e).__name__}: {e}); pip install -r requirements.txt"
    try:
        import torchvision
        torchvision.ops.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)  # a compiled op: fails on a mismatch
    except Exception as e:
        return (f"torchvision does not work with torch {torch.__version__} ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}); install both from one index, e.g. "
                "pip install --force-reinstall torch torchvision (with --index-url "
                "https://download.pytorch.org/whl/cpu for the CPU-only build of both)")
    missing = [name for name in RUNTIME if importlib.util.find_spec(name) is None]
    if missing:
        return f"missing: {', '.join(missing)}; pip install -r requirements.txt"
    build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU build"
    device = f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "cpu"
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__} ({build}); device: {device}")
    return None


if __name__ == "__main__":
    problem = main()
    if problem:
        print(f"check_install.py: error: {problem}", file=sys.stderr)
    sys.exit(1 if problem else 0)
