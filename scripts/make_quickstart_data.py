"""Regenerate the quickstart's sample data in assets/ from scikit-image's bundled sample images.

    python scripts/make_quickstart_data.py   # from the repository root; needs scikit-image

photos/: each image resized to 256 px on its shorter side, JPEG quality 90. tiles/: the 64x64 tiles that
configs/quickstart.yaml trains and validates on, on a 64-px grid. Training tiles come from the four colour
photos only, each at two scales (shorter side 256 px, cut from the saved JPEG, and 384 px: finer detail);
validation tiles from chelsea and coffee only, which no training tile comes from. Greyscale photos are left
out: with half the tiles grey, the model learnt that colours are faint and reconstructed new photos in sepia.
Same files byte for byte with the same Pillow and scikit-image (licences and versions: assets/README.md).
"""
import os
import shutil

from PIL import Image
from skimage import data

TRAIN = ["astronaut", "hubble_deep_field", "retina", "rocket"]
VAL = ["chelsea", "coffee"]
SIDE, TRAIN_SIDES, TILE = 256, (256, 384), 64


def resized(name, side):
    """scikit-image's image, RGB, shorter side `side` px (bicubic)."""
    img = Image.fromarray(getattr(data, name)()).convert("RGB")
    scale = side / min(img.size)
    return img.resize((round(img.width * scale), round(img.height * scale)), Image.BICUBIC)


def photo(name):
    """assets/photos/NAME.jpg (shorter side SIDE px), read back: tiles are cut from it as from a JPEG."""
    path = f"assets/photos/{name}.jpg"
    resized(name, SIDE).save(path, quality=90)
    return Image.open(path)


def save_tiles(img, folder, stem):
    for y in range(0, img.height - TILE + 1, TILE):
        for x in range(0, img.width - TILE + 1, TILE):
            img.crop((x, y, x + TILE, y + TILE)).save(f"{folder}/{stem}_y{y:03d}_x{x:03d}.jpg", quality=90)


def main():
    for folder in ("assets/photos", "assets/tiles/train", "assets/tiles/val"):
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
    for name in TRAIN:
        for side in TRAIN_SIDES:
            image = photo(name) if side == SIDE else resized(name, side)
            save_tiles(image, "assets/tiles/train", f"{name}_{side}")
    for name in VAL:
        save_tiles(photo(name), "assets/tiles/val", name)
    for split in ("train", "val"):
        print(f"assets/tiles/{split}: {len(os.listdir(f'assets/tiles/{split}'))} tiles")


if __name__ == "__main__":
    main()
