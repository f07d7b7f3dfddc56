"""Interactive viewers (`pipelines/viewers.py`): the size of each page and the seconds to write it.

Rows: a volume r map on its own grid (no template) and over the MNI152 template (nilearn's
``view_img``, brainsprite), at the sizes a study has (a 3 mm and a 2 mm MNI brain, LeBel's
2.6 mm subject grid); a surface r map on fsaverage5, fsaverage6 and fsaverage (nilearn's
``view_surf``, niivue; the nested fsaverage5 vertices are drawn). Values: Gaussian r (sd 0.1)
inside a brain-shaped ellipsoid, so about a third of the voxels pass the default threshold 0.1.
Each row is written once, in this process, one after the other (seconds include nilearn's
resampling to the template and the PNG sprites); the load average is recorded (the machine is
shared).

Usage::

    python bench/bench_viewers.py --out bench/results/viewers.md    # about a minute
    python bench/bench_viewers.py --quick --out /tmp/viewers.md     # two small rows, seconds
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.viewers import feature_viewers, volume_viewer  # noqa: E402

VOLUMES = {  # name: (shape, voxel size mm, space)
    "MNI 3 mm": ((61, 73, 61), 3.0, "MNI152NLin2009cAsym"),
    "MNI 2 mm": ((91, 109, 91), 2.0, "MNI152NLin2009cAsym"),
    "subject grid 2.6 mm (LeBel)": ((84, 84, 54), 2.6, "T1w"),
    "subject grid 2.6 mm over MNI (as if registered)": ((84, 84, 54), 2.6, "MNI152NLin2009cAsym"),
}
SURFACES = {"fsaverage5": 10242, "fsaverage6": 40962, "fsaverage": 163842}


def brain_volume(shape: tuple[int, int, int], mm: float, rng) -> nib.Nifti1Image:
    grid = np.indices(shape).astype(np.float32)
    centre = (np.array(shape) - 1)[:, None, None, None] / 2
    inside = (((grid - centre) / (0.42 * np.array(shape))[:, None, None, None]) ** 2).sum(0) <= 1
    data = np.where(inside, rng.normal(0, 0.1, shape), 0).astype(np.float32)
    affine = np.diag([mm, mm, mm, 1.0])
    affine[:3, 3] = -centre[:, 0, 0, 0] * mm
    return nib.Nifti1Image(data, affine)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--quick", action="store_true", help="two small rows (a smoke run)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    volumes = {"MNI 3 mm": VOLUMES["MNI 3 mm"]} if args.quick else VOLUMES
    surfaces = {"fsaverage5": 10242} if args.quick else SURFACES
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        # untimed: nilearn's imports and the template's first load, so every row is the page's own work
        volume_viewer(brain_volume((9, 9, 9), 3.0, rng), Path(tmp) / "w.html", title="w", threshold=0.1,
                      space="MNI152NLin2009cAsym")
        for name, (shape, mm, space) in volumes.items():
            img = brain_volume(shape, mm, rng)
            t0 = time.perf_counter()
            page = volume_viewer(img, Path(tmp) / "v.html", title=name, threshold=0.1, space=space)
            rows.append((f"volume, {name} {shape}", space, time.perf_counter() - t0, page.stat().st_size))
        for name, n in surfaces.items():
            r = rng.normal(0, 0.1, 2 * n).astype(np.float32)
            arrays = {"r": r, "info__hemi": np.array(["L"] * n + ["R"] * n),
                      "info__vertex": np.r_[np.arange(n), np.arange(n)]}
            t0 = time.perf_counter()
            page, _ = feature_viewers("gifti", arrays, None, "r", Path(tmp) / "s.html", title=name, threshold=0.1,
                                      space=name)
            rows.append((f"surface, {name} ({2 * n} vertices)", name, time.perf_counter() - t0, page.stat().st_size))
    import nilearn

    lines = [
        "# Interactive viewers: page size and seconds to write",
        "",
        f"`python bench/bench_viewers.py{' --quick' if args.quick else ''}` on {platform.node()} "
        f"({os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}), nilearn {nilearn.__version__}.",
        "Threshold 0.1 (the default), Gaussian r (sd 0.1) inside a brain-shaped ellipsoid.",
        "",
        "| map | space | seconds | page MB |",
        "|---|---|---:|---:|",
        *[f"| {m} | {s} | {t:.1f} | {b / 1e6:.2f} |" for m, s, t, b in rows],
        "",
        "A page is linked from the report, not embedded in it (pipelines/viewers.py says why); a surface page",
        "carries niivue (2.2 MB) whatever the mesh, and draws the fsaverage5 vertices of finer fsaverage meshes.",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
