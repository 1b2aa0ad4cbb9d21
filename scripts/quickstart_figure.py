"""The README's quickstart picture and figures: the held-out photos (chelsea, coffee: no training tile comes
from them) above their full-size reconstructions by the quickstart model, made with infer.py as the README
runs it, and PSNR, SSIM (losses.psnr/ssim) and the per-channel mean colour error in 8-bit levels.

    python scripts/quickstart_figure.py        # after the quickstart; writes assets/quickstart_result.png
"""
import argparse
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

import infer  # noqa: E402
import losses  # noqa: E402
from data import image_grid, load_image  # noqa: E402

HELD_OUT = ["chelsea", "coffee"]  # assets/README.md: no training tile comes from these two photos


def pixels(path):  # (1, 3, H, W) in [-1, 1]
    return losses.from_uint8(torch.from_numpy(np.array(load_image(path))).permute(2, 0, 1)[None])


def measure(model_path, name, output):
    """Reconstruct held-out photo `name` with infer.py as the README runs it (written to `output`): (input,
    reconstruction, PSNR, SSIM, mean colour error per channel in 8-bit levels), or None if infer.py failed."""
    src = os.path.join(ROOT, "assets", "photos", f"{name}.jpg")
    if infer.main(["--model_path", model_path, "--input", src, "--output", output]) != 0:
        return None
    x, y = pixels(src), pixels(output)
    colour = ((y - x).mean(dim=(0, 2, 3)) * 127.5).tolist()
    return x, y, float(losses.psnr(x, y)[0]), float(losses.ssim(x, y)[0]), colour


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model_path", default=os.path.join(ROOT, "outputs", "final_model"))
    p.add_argument("--output", default=os.path.join(ROOT, "assets", "quickstart_result.png"))
    p.add_argument("--height", type=int, default=128, help="thumbnail height in the picture")
    args = p.parse_args(argv)
    pairs = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in HELD_OUT:
            result = measure(args.model_path, name, os.path.join(tmp, f"{name}.png"))
            if result is None:
                return 1
            x, y, psnr, ssim, colour = result
            print(f"{name}: PSNR {psnr:.2f} dB, SSIM {ssim:.3f}, "
                  f"mean colour error (R, G, B) {', '.join(f'{c:+.1f}' for c in colour)} / 255")
            w = round(x.shape[3] * args.height / x.shape[2])
            pairs.append([F.interpolate(t, (args.height, w), mode="area")[0] for t in (x, y)])
    grid = (image_grid(pairs) * 255).round().byte().permute(1, 2, 0).numpy()
    Image.fromarray(grid).save(args.output, optimize=True)
    print(f"wrote {args.output} (originals above reconstructions)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
