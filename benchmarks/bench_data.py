"""Data-loader throughput: images/s of data.py's ResumableLoader (decode + resize + random crop/flip +
collate) for each worker count, and of data_stream.StreamingLoader over the same images packed as WebDataset
tar shards.

    python benchmarks/bench_data.py FOLDER    # or without FOLDER: 64 sample photos at ~600 px
    python benchmarks/bench_data.py --shards  # also the same images streamed from WebDataset tar shards
"""
import argparse
import logging
import os
import sys
import tempfile
import time

from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project's files
import data  # noqa: E402
import data_stream  # noqa: E402
from config import config_from_dict  # noqa: E402


def write_sample_images(folder, n=64, size=600):
    """n JPEGs (shorter side `size` to 1.14 `size`) made from scikit-image's sample photos: a throughput test
    set."""
    from skimage import data as skdata
    names = ["astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field",
             "retina", "cat"]
    os.makedirs(folder, exist_ok=True)
    for k in range(n):
        img = Image.fromarray(getattr(skdata, names[k % len(names)])()).convert("RGB")
        scale = size / min(img.size) * (1 + 0.02 * (k // len(names)))
        img.resize((round(img.width * scale), round(img.height * scale)), Image.BICUBIC).save(
            os.path.join(folder, f"sample_{k:03d}.jpg"), quality=95)
    return folder


def benchmark(folder, resolution=512, batch_size=8, workers=(0, 1, 2), epochs=2, shards=None):
    """Images/s of ResumableLoader (decode + resize + random crop/flip + collate) for each worker count; with
    `shards` (a folder) also of data_stream.StreamingLoader over the same images packed there as WebDataset
    tars. The first epoch (worker start-up, file cache) is not timed."""
    transform = data.SDTransform(resolution, center_crop=False, random_flip=True)
    ds = data.ImageDataset(data.find_images(folder), transform, max_bad_fraction=0.01)
    loaders = {"folder": lambda w: data.ResumableLoader(ds, batch_size, num_workers=w, drop_last=False)}
    if shards is not None:
        pattern = data_stream.write_shards(ds.source, shards, 16)
        stream = data_stream.open_stream(config_from_dict({"data": {"train_shards": pattern}}).data)
        loaders["shards"] = lambda w: data_stream.StreamingLoader(
            stream, transform, batch_size, num_workers=w, shuffle_buffer=64, max_bad_fraction=0.01)
    results = {}
    for kind, make in loaders.items():
        for w in workers:
            loader = make(w)
            for _ in loader:
                pass
            t0, cpu0, count = time.perf_counter(), time.process_time(), 0
            for _ in range(epochs):
                for batch in loader:
                    count += len(batch["pixel_values"])
            results[kind, w] = count / (time.perf_counter() - t0)
            cpu = (time.process_time() - cpu0) / count * 1e3  # main-process CPU: the host load with 0 workers
            print(f"{kind} num_workers={w}: {results[kind, w]:7.1f} images/s  ({len(ds)} images, "
                  f"{resolution}^2, batch {batch_size}" + (f", {cpu:.1f} CPU-ms/image)" if w == 0 else ")"))
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", nargs="?", default="", help="images (default: 64 made from sample photos)")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--shards", action="store_true", help="also time the streamed-shard loader")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            benchmark(args.folder or write_sample_images(tmp), args.resolution, args.batch_size, args.workers,
                      shards=os.path.join(tmp, "shards") if args.shards else None)
    except data.DataError as e:
        sys.exit(f"error: {e}")
