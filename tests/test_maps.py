"""Score maps (NIfTI, TSV, PNG) and the self-contained HTML report."""
from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.image as mpimg  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from pipelines.errors import ConfigError, DatasetError, NeuroflowError  # noqa: E402
from pipelines.maps import (  # noqa: E402
    bids_map_name,
    render_histogram_png,
    render_targets_png,
    render_volume_png,
    write_target_table,
    write_volume_map,
)
from pipelines.report import render_report  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def mask_img() -> nib.Nifti1Image:
    """The MNI152 brain mask at 8 mm (a few thousand voxels)."""
    from nilearn import datasets, image

    mask = datasets.load_mni152_brain_mask(resolution=2)
    return image.resample_img(mask, target_affine=np.diag([8.0, 8.0, 8.0]), interpolation="nearest",
                              force_resample=True, copy_header=True)


def _mask_xyz(mask_img):
    mask = np.asanyarray(mask_img.dataobj) != 0
    ijk = np.argwhere(mask)
    return mask, ijk, nib.affines.apply_affine(mask_img.affine, ijk)


def _assert_png(path: Path) -> np.ndarray:
    data = Path(path).read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[1] >= 700
    assert float(img[..., :3].std()) > 0
    return img


@pytest.fixture(scope="module")
def blob_map(mask_img, tmp_path_factory):
    """A noise-free map: 0 everywhere, 0.6 in a right-hemisphere sphere, one NaN voxel."""
    _, ijk, xyz = _mask_xyz(mask_img)
    values = np.zeros(len(ijk), dtype=np.float32)
    blob = np.linalg.norm(xyz - np.array([40.0, -20.0, 20.0]), axis=1) < 20
    assert blob.sum() > 5
    values[blob] = 0.6
    nan_index = int(np.flatnonzero(~blob)[0])
    values[nan_index] = np.nan
    path = write_volume_map(values, mask_img, tmp_path_factory.mktemp("maps") / "blob.nii.gz")
    return path, values, blob, nan_index


# --- names -------------------------------------------------------------------------------

def test_bids_map_name_volume():
    name = bids_map_name("01", "alice", "MNI152NLin2009cAsym", "lm_L6", "r", ".nii.gz")
    assert name == "sub-01_task-alice_space-MNI152NLin2009cAsym_desc-lmL6_stat-r_statmap.nii.gz"


def test_bids_map_name_table_without_space_and_prefixed_labels():
    name = bids_map_name("sub-02", "task-lw1", None, "gpt2.layer-3", "r2", ".tsv")
    assert name == "sub-02_task-lw1_desc-gpt2layer3_stat-r2_statmap.tsv"
    assert re.fullmatch(r"(?:[a-z]+-[A-Za-z0-9]+_)+statmap\.tsv", name)


def test_bids_map_name_rejects_bad_input():
    with pytest.raises(ConfigError, match="extension"):
        bids_map_name("01", "alice", None, "lm", "r", ".nii")
    with pytest.raises(ConfigError, match="desc"):
        bids_map_name("01", "alice", None, "__", "r", ".tsv")


# --- volume maps -------------------------------------------------------------------------

def test_volume_map_roundtrip(mask_img, blob_map):
    path, values, blob, nan_index = blob_map
    assert path.name.endswith(".nii.gz") and path.read_bytes()[:2] == b"\x1f\x8b"
    img = nib.load(path)
    assert img.shape == mask_img.shape
    np.testing.assert_allclose(img.affine, mask_img.affine)
    assert img.get_data_dtype() == np.float32
    data = img.get_fdata()
    mask, ijk, _ = _mask_xyz(mask_img)
    np.testing.assert_array_equal(data[mask], values)  # NaN positions compare equal
    i, j, k = ijk[nan_index]
    assert np.isnan(data[i, j, k])
    assert np.isnan(data).sum() == 1
    assert np.all(data[~mask] == 0)
    i, j, k = ijk[np.flatnonzero(blob)[0]]
    assert data[i, j, k] == pytest.approx(0.6)


def test_volume_map_rejects_wrong_length(mask_img, tmp_path):
    n = int((np.asanyarray(mask_img.dataobj) != 0).sum())
    with pytest.raises(DatasetError, match="bad.nii.gz"):
        write_volume_map(np.zeros(n + 1), mask_img, tmp_path / "bad.nii.gz")


def test_glass_brain_png_shows_planted_blob(mask_img, blob_map, tmp_path):
    path, *_ = blob_map
    png = render_volume_png(path, tmp_path / "blob.png", "planted blob", threshold=0.1)
    img = _assert_png(png)
    # The blob is the only thing above threshold: saturated red pixels must appear.
    rgb = img[..., :3]
    red = (rgb[..., 0] > 0.4) & (rgb[..., 1] < 0.2) & (rgb[..., 2] < 0.2)
    assert red.sum() > 100

    empty = write_volume_map(np.zeros(len(_mask_xyz(mask_img)[1])), mask_img, tmp_path / "empty.nii.gz")
    rgb_empty = _assert_png(render_volume_png(empty, tmp_path / "empty.png", "empty", threshold=0.1))[..., :3]
    red_empty = (rgb_empty[..., 0] > 0.4) & (rgb_empty[..., 1] < 0.2) & (rgb_empty[..., 2] < 0.2)
    assert red.sum() > red_empty.sum() + 100


# --- ROI / channel tables ----------------------------------------------------------------

def test_target_table_roundtrip(tmp_path):
    names = ["V1", "STG left", "IFG"]
    r = np.array([0.12, np.nan, -0.03])
    alpha = np.array([10.0, 100.0, 1000.0])
    path = write_target_table({"r": r, "alpha": alpha}, names, tmp_path / "t.tsv")
    df = pd.read_csv(path, sep="\t", na_values="n/a", keep_default_na=False)
    assert list(df.columns) == ["target", "r", "alpha"]
    assert df["target"].tolist() == names
    np.testing.assert_allclose(df["r"].to_numpy(), r)
    np.testing.assert_allclose(df["alpha"].to_numpy(), alpha)
    with pytest.raises(DatasetError, match="alpha"):
        write_target_table({"alpha": alpha[:2]}, names, tmp_path / "bad.tsv")


def test_targets_and_histogram_pngs(tmp_path, rng):
    names = [f"ch{i}" for i in range(30)]
    values = rng.normal(0.05, 0.1, 30)
    values[3] = np.nan
    _assert_png(render_targets_png(names, values, tmp_path / "bars.png", "r per channel"))
    hist = render_histogram_png(
        {"lm_L6": rng.normal(0.1, 0.05, 500), "spectral": np.r_[rng.normal(0, 0.05, 200), np.nan],
         "all_nan": np.full(4, np.nan)},
        tmp_path / "hist.png", "r per feature space")
    _assert_png(hist)
    _assert_png(render_histogram_png({"x": np.full(3, np.nan)}, tmp_path / "none.png", "nothing"))


# --- report ------------------------------------------------------------------------------

def _png(tmp_path: Path, name: str, rng) -> Path:
    return render_targets_png(["a", "b", "c"], rng.normal(size=3), tmp_path / name, name)


def test_report_is_self_contained_and_escaped(tmp_path, rng):
    img1, img2 = _png(tmp_path, "one.png", rng), _png(tmp_path, "two.png", rng)
    evil = "<script>alert('x')</script>"
    report = {
        "title": "Encoding report",
        "dataset": {"id": "ds003020", "version": "2.2.0", "source": "s3://openneuro.org/ds003020"},
        "analysis_id": "an-7f3a",
        "config_yaml": "model:\n  alphas: [1, 10]\nnote: a < b & c\n",
        "provenance": {"git_commit": "abc123", "neuroflow": "0.1.0", "features": {"lm": "L6"}},
        "subjects": [
            {"label": "01", "simulated": False, "feature_spaces": [
                {"name": "lm_L6", "metrics": {"mean_r": 0.1234, "median_r": 0.1111, "max_r": 0.5678,
                                             "n_targets": 3666, "n_valid": 3600},
                 "images": [{"path": str(img1), "caption": "glass brain"}]},
            ]},
            {"label": evil, "simulated": True, "feature_spaces": [
                {"name": "spectral", "metrics": {"mean_r": float("nan"), "median_r": 0.02, "max_r": 0.3,
                                                "n_targets": 10, "n_valid": 0},
                 "images": [{"path": img2, "caption": "bars <b>"}]},
            ]},
        ],
    }
    out = render_report(report, tmp_path / "out" / "report.html")
    assert sorted(p.name for p in out.parent.iterdir()) == ["report.html"]
    html = out.read_text(encoding="utf-8")

    # self-contained: no external references at all
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:|//)""", html, re.I)
    assert "<link" not in html.lower()
    assert "@import" not in html and "url(" not in html
    assert "<script" not in html.lower()
    # images embedded
    uris = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(uris) == 2
    import base64
    assert base64.b64decode(uris[0]).startswith(PNG_SIGNATURE)
    # escaping
    assert "&lt;script&gt;" in html
    assert "bars &lt;b&gt;" in html
    assert "a &lt; b &amp; c" in html
    # content
    for text in ("ds003020", "2.2.0", "an-7f3a", "lm_L6", "spectral", "0.123", "0.111", "0.568",
                 "3666", "3600", "abc123", "git_commit", "alphas: [1, 10]", "n/a"):
        assert text in html, text
    # the simulated subject is marked, the real one is not
    assert re.search(r"<h2[^>]*>Subject &lt;script.*?simulated</span></h2>", html)
    assert re.search(r"<h2[^>]*>Subject 01</h2>", html)


def test_report_missing_image_names_file(tmp_path):
    report = {"title": "t", "dataset": {"id": "d", "version": "1", "source": ""}, "analysis_id": "a",
              "config_yaml": "", "provenance": {},
              "subjects": [{"label": "01", "simulated": False, "feature_spaces": [
                  {"name": "f", "metrics": {}, "images": [{"path": tmp_path / "nope.png", "caption": ""}]}]}]}
    with pytest.raises(NeuroflowError, match="nope.png"):
        render_report(report, tmp_path / "r.html")
    assert not (tmp_path / "r.html").exists()


def test_many_targets_draw_a_bounded_sorted_curve_naming_the_best(tmp_path, rng, monkeypatch):
    """80,000 voxels: no bar per target; the figure holds at most CURVE_POINTS points whatever n."""
    import pipelines.maps as maps

    drawn = {}
    real_save = maps._save

    def keep(fig, png_path):
        drawn["axes"] = fig.axes
        return real_save(fig, png_path)

    monkeypatch.setattr(maps, "_save", keep)
    n = 80_000
    values = rng.normal(0.0, 0.05, n)
    values[123] = 0.9
    values[:50] = np.nan
    names = [f"voxel{i}" for i in range(n)]
    _assert_png(render_targets_png(names, values, tmp_path / "curve.png", "r per voxel"))
    curve_ax, text_ax = drawn["axes"]
    assert len(curve_ax.patches) == 0  # no bars
    (line,) = curve_ax.lines[:1]
    assert len(line.get_xdata()) <= maps.CURVE_POINTS
    assert line.get_ydata()[0] == pytest.approx(0.9)  # sorted from the best
    listing = text_ax.texts[0].get_text()
    assert "1. voxel123" in listing and listing.count("\n") == maps.BEST_NAMED
    assert f"{n - 50:,} valid of {n:,}" in curve_ax.get_xlabel()
    # a few ROIs still get one bar each
    render_targets_png(names[:30], values[100:130], tmp_path / "bars.png", "r per ROI")
    assert len(drawn["axes"][0].patches) == 30
