"""Benchmark `litegpt prepare` against the naive loop a paper reproduction would write.

Side by side, in one run, on the same synthetic DICOMs (longest side 1500-3000 px, like VinDr-CXR):
- naive: one process, the paper's appendix A.1 conversion in float64 at full resolution, JPEG save;
- prepare, 1 worker and 2 workers: LUT conversion, resize to 1024, PNG, tar shards, manifest.
Each variant runs in its own subprocess so its peak memory is its own.

    python benchmarks/prepare.py [--images 40] [--max-side-px 3000]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def naive(root: Path, out: Path) -> int:
    """The appendix A.1 code, applied file by file as the authors' scripts do."""
    import pydicom
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    files = sorted(root.glob("*/*.dicom"))
    for path in files:
        dicom = pydicom.dcmread(path)
        image = dicom.pixel_array.astype(np.float64)
        flip = -1 if dicom[0x00280004].value == "MONOCHROME1" else 1
        try:
            normalized = (image - float(dicom[0x00281050].value)) / float(dicom[0x00281051].value)
        except (KeyError, TypeError):  # TypeError: multi-valued window tags, which the paper's code also trips on
            normalized = (image - np.mean(image)) / (np.max(image) - np.min(image))
        image = (np.clip(normalized, -1, 1) * flip * 127.5 + 127.5).astype(np.uint8)
        Image.fromarray(image).convert("RGB").save(out / f"{path.stem}.jpg")
    return len(files)


def ours(root: Path, out: Path, workers: int) -> int:
    from litegpt.data.policy import PolicyConfig
    from litegpt.data.prepare import PrepareConfig, prepare

    # `union` keeps every image, so both sides convert the same files
    manifest = prepare(PrepareConfig(root=root, out=out, workers=workers, policy=PolicyConfig("union")))
    return sum(s["samples"] for s in manifest["shards"]) + len(manifest["dropped"])


def measure(variant: str, root: Path, out: Path) -> dict:
    """Runs in the child process: time the variant and report peak RSS of its processes."""
    start = time.perf_counter()
    if variant == "naive":
        count = naive(root, out)
    else:
        count = ours(root, out, int(variant.split("-")[1]))
    seconds = time.perf_counter() - start
    peak_kb = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    return {"variant": variant, "images": count, "seconds": seconds, "peak_mb": peak_kb / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--max-side-px", type=int, default=3000)
    parser.add_argument("--child", nargs=3, metavar=("VARIANT", "ROOT", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        variant, root, out = args.child
        print(json.dumps(measure(variant, Path(root), Path(out))))
        return

    from litegpt.data.synth import synthesize

    with tempfile.TemporaryDirectory() as tmp:
        root = synthesize(Path(tmp) / "root", args.images, 0, seed=1, max_side_px=args.max_side_px, progress=False)
        sides = []
        import pydicom

        for path in sorted(root.glob("train/*.dicom")):
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            sides.append(max(ds.Rows, ds.Columns))
        rows = []
        for variant in ("naive", "prepare-1", "prepare-2"):
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            done = subprocess.run([sys.executable, __file__, "--child", variant, str(root), f"{tmp}/{variant}"],
                                  check=True, capture_output=True, text=True, env=env)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    base = rows[0]["images"] / rows[0]["seconds"]
    one = rows[1]["images"] / rows[1]["seconds"]
    print(f"{args.images} synthetic DICOMs, longest side {min(sides)}-{max(sides)} px (mean {np.mean(sides):.0f}); "
          f"{os.cpu_count()} cores\n")
    print("| variant | images/s | vs naive | parallel efficiency | peak RSS per process |")
    print("|---|---|---|---|---|")
    for row in rows:
        rate = row["images"] / row["seconds"]
        workers = 1 if row["variant"] != "prepare-2" else 2
        eff = f"{rate / one / workers:.0%}" if row["variant"].startswith("prepare") else "-"
        print(f"| {row['variant']} | {rate:.2f} | {rate / base:.2f}x | {eff} | {row['peak_mb']:.0f} MB |")


if __name__ == "__main__":
    main()
