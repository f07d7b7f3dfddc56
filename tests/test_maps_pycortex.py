"""pycortex flatmaps (``maps.pycortex``) on ds003020's layout, with pycortex's own demo subject.

The dataset is LeBel et al.'s layout (the real metadata, synthetic HDF5 responses and
TextGrids at the real paths; see ``test_datasets_lebel.py``) plus a pycortex database at
``derivative/pycortex-db/UTS01/`` as ds003020 publishes one. Its content is pycortex's demo
subject S1, copied from the installed package (never written to) and renamed UTS01: the
surfaces unchanged, and a transform ``UTS01_auto`` regenerated from S1's ``fullhead`` on a
grid 4 x 4 x 2 times coarser (so the "thick" cortical mask has a few thousand voxels, not
80,615), with its ``mask_thick.nii.gz`` made by pycortex. UTS01's responses are the voxels of
that mask in pycortex's order; a ball of them follows the word rate. Nothing of pycortex is
mocked: the flatmap is pycortex's quickflat, and where the planted voxels should appear on it
is asked of pycortex's own pixel mapping.
"""
from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from pipelines.config import parse_config
from pipelines.errors import DatasetError

from .conftest import demo_config
from .datasets import hf5_bytes, metadata_files, planted, stage, synthetic_words, textgrid_bytes, word_rate
from .test_datasets_lebel import NAME, RESPONSES, START, STORIES, TR, TRIM, WORDS

pytestmark = pytest.mark.integration

SOURCE = "s3://pycortex-layouts/ds003020"  # a bucket of its own: the LeBel tests' listing stays as it was
DB = "derivative/pycortex-db"
COARSE = (4.0, 4.0, 2.0)  # x, y, z: UTS01_auto's voxels are this many of S1 fullhead's
DB_FILES = ["surfaces/flat_lh.gii", "surfaces/flat_rh.gii", "surfaces/pia_lh.gii", "surfaces/pia_rh.gii",
            "surfaces/wm_lh.gii", "surfaces/wm_rh.gii"]


def _installed_s1() -> Path:
    """The S1 subject pycortex installs (``<prefix>/share/pycortex/db/S1``), found from its file list."""
    from importlib import metadata

    for f in metadata.distribution("pycortex").files or []:
        if str(f).endswith("db/S1/surfaces/flat_lh.gii"):
            return Path(f.locate()).resolve().parents[1]
    pytest.skip("pycortex's demo subject S1 is not installed")


def _snapshot(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def pycortex(tmp_path_factory):
    """pycortex, imported with its user config in a temporary folder (it writes one when missing)."""
    if "cortex" not in sys.modules:
        mp = pytest.MonkeyPatch()
        mp.setenv("XDG_CONFIG_HOME", str(tmp_path_factory.mktemp("xdg")))
        try:
            pytest.importorskip("cortex")
            from pipelines.flatmap import import_cortex

            import_cortex()
        finally:
            mp.undo()
    s1 = _installed_s1()
    before = _snapshot(s1)
    yield s1
    assert _snapshot(s1) == before, "the installed pycortex filestore was written to"


@pytest.fixture(scope="module")
def database(pycortex, tmp_path_factory) -> dict:
    """S1 renamed UTS01, with the coarse transform UTS01_auto and its thick mask made by pycortex."""
    import nibabel as nib

    from pipelines.flatmap import import_cortex, using_filestore

    cortex = import_cortex()
    store = tmp_path_factory.mktemp("pycortex-build")
    for rel in DB_FILES:
        (store / "UTS01" / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(pycortex / rel, store / "UTS01" / rel)
    (store / "UTS01" / "transforms" / "fullhead").mkdir(parents=True)
    for name in ("matrices.xfm", "reference.nii.gz"):
        shutil.copyfile(pycortex / "transforms" / "fullhead" / name, store / "UTS01" / "transforms" / "fullhead" / name)
    ref = nib.load(str(store / "UTS01" / "transforms" / "fullhead" / "reference.nii.gz"))
    shape = tuple(int(np.ceil(s / f)) for s, f in zip(ref.shape[:3], COARSE))
    coarse_ref = store / "coarse_reference.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(shape, np.float32), ref.affine @ np.diag([*COARSE, 1.0])), str(coarse_ref))
    with using_filestore(store) as db:
        coord = np.diag([*(1 / np.array(COARSE)), 1.0]) @ db.get_xfm("UTS01", "fullhead", xfmtype="coord").xfm
        db.save_xfm("UTS01", "UTS01_auto", coord, xfmtype="coord", reference=str(coarse_ref))
        mask = db.get_mask("UTS01", "UTS01_auto", "thick")  # (z, y, x), generated and saved by pycortex
    assert cortex.db.filestore != str(store)  # restored after the block
    files = {f"{DB}/UTS01/{rel}": store / "UTS01" / rel for rel in DB_FILES}
    for name in ("matrices.xfm", "reference.nii.gz", "mask_thick.nii.gz"):
        files[f"{DB}/UTS01/transforms/UTS01_auto/{name}"] = store / "UTS01" / "transforms" / "UTS01_auto" / name
    return {"files": files, "mask": mask, "store": store}


@pytest.fixture(scope="module")
def layout(database) -> dict:
    """ds003020's layout with UTS01 (flatmappable), UTS02 (a voxel count of no mask), UTS03 (no database)."""
    rng = np.random.default_rng(1)
    respdict = json.loads((metadata_files(NAME)["derivative/respdict.json"]).read_text())
    mask = database["mask"]
    idx = np.argwhere(mask)  # pycortex's voxel order: C order of the (z, y, x) mask
    centre = idx[len(idx) // 3]
    ball = np.flatnonzero(((idx - centre) ** 2).sum(axis=1) <= 2.5 ** 2)
    n_vox = len(idx)
    files = dict(metadata_files(NAME))
    files.update(database["files"])
    for story in STORIES:
        n = respdict[story] - TRIM
        words = synthetic_words(rng, 1.0, START + TR * n - 3.0)
        files[f"derivative/TextGrids/{story}.TextGrid"] = textgrid_bytes(words, START + TR * n + 8)
        signal = word_rate(words, START + TR * np.arange(n))
        files[f"derivative/preprocessed_data/UTS01/{story}.hf5"] = hf5_bytes(
            planted(rng, signal, n_vox, ball, scale=10.0, base=100.0))
    n = respdict["inamoment"] - TRIM
    files["derivative/preprocessed_data/UTS02/inamoment.hf5"] = hf5_bytes(rng.standard_normal((n, n_vox - 8)))
    files["derivative/preprocessed_data/UTS03/inamoment.hf5"] = hf5_bytes(rng.standard_normal((n, n_vox)))
    stage(SOURCE, files)
    return {"ball": ball, "n_vox": n_vox, "mask": mask}


def config(output: str, tmp_path, subjects=("UTS01",), **pycortex) -> dict:
    cfg = demo_config(tmp_path, output, subjects=subjects)
    cfg["dataset"].update(source=SOURCE, version="3.1.0", task="stories", responses=RESPONSES, word_timings=WORDS)
    cfg["features"] = [{"name": "wordrate", "kind": "word_rate"}]
    cfg["model"] = {"delays": [0, 1], "alphas": [0.1, 1, 10, 100, 1000]}
    cfg["maps"] = {"pycortex": pycortex}
    return cfg


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One download cache for the module: the private pycortex filestore (and its flatmap caches) is shared."""
    return tmp_path_factory.mktemp("cache")


def _planted_pixels(filestore: Path, mask: np.ndarray, ball: np.ndarray, height: int) -> np.ndarray:
    """pycortex's flatmap image of the planted ball's indicator: which flatmap pixels show those voxels."""
    from pipelines.flatmap import import_cortex, using_filestore

    cortex = import_cortex()
    indicator = np.zeros(int(mask.sum()), np.float32)
    indicator[ball] = 1.0
    with using_filestore(filestore):
        vol = cortex.Volume(indicator, "UTS01", "UTS01_auto", mask="thick")
        img, _ = cortex.quickflat.utils.make_flatmap_image(vol, height=height)
    return np.asarray(img, dtype=float)  # rows top to bottom as drawn; NaN outside the flatmap


def _decoded(png: bytes) -> np.ndarray:
    """Each pixel's value on the colour scale (-1 to 1 of RdBu_r), read back from its colour; NaN for
    pixels of no colour of the scale (background, title, curvature)."""
    import matplotlib
    import matplotlib.image as mpimg
    from scipy.spatial import cKDTree

    rgb = mpimg.imread(io.BytesIO(png), format="png")[..., :3]
    lut = matplotlib.colormaps["RdBu_r"](np.linspace(0, 1, 256))[:, :3]
    dist, nearest = cKDTree(lut).query(rgb.reshape(-1, 3))
    values = np.where(dist < 0.02, np.linspace(-1, 1, 256)[nearest], np.nan)
    return values.reshape(rgb.shape[:2])


def test_config_without_maps_keeps_its_id(tmp_path):
    """No ``maps`` in a config: the resolved config (hence the analysis id) is the one it always had."""
    cfg = demo_config(tmp_path, "s3://out")
    plain = parse_config(cfg)
    assert "maps" not in plain.to_dict() and parse_config(plain.to_dict()).config_hash == plain.config_hash
    cfg["maps"] = {"pycortex": {}}
    with_maps = parse_config(cfg)
    assert with_maps.maps.pycortex.names("UTS01") == ("UTS01", "UTS01_auto")
    assert with_maps.to_dict()["maps"]["pycortex"]["database"] == DB and with_maps.config_hash != plain.config_hash
    cfg["maps"] = {"pycortex": {"transfrom": "x"}}
    with pytest.raises(ValueError, match=r"unknown key 'maps\.pycortex\.transfrom'\. Did you mean 'transform'"):
        parse_config(cfg)
    cfg["maps"] = {"pycortex": {"subject": "../{subject}"}}
    with pytest.raises(ValueError, match=r"maps\.pycortex\.subject: a pycortex name"):
        parse_config(cfg)
    cfg["maps"] = {"pycortex": {"database": "/abs/db"}}
    with pytest.raises(ValueError, match=r"'maps\.pycortex\.database' is absolute"):
        parse_config(cfg)


@pytest.mark.slow
def test_flatmap_is_published_and_shows_the_planted_voxels(layout, database, cache, tmp_path, results_bucket):
    """prepare -> features -> fit -> publish with ``maps.pycortex``: a flatmap PNG in the manifest and report."""
    import base64

    from pipelines.consume import read_manifest
    from pipelines.flatmap import HEIGHT
    from pipelines.run import run_analysis
    from pipelines.resultstore import ResultStore

    result = run_analysis(parse_config(config(results_bucket, tmp_path)), cache_dir=cache)
    assert result["status"] == "complete"
    manifest = read_manifest(result["manifest_uri"])
    (flat,) = [a for a in manifest["artifacts"] if a["kind"] == "flatmap_png"]
    assert flat["path"] == "sub-UTS01/figures/sub-UTS01_task-stories_desc-wordrate_stat-r_flatmap.png"
    assert flat["subject"] == "UTS01" and flat["feature_space"] == "wordrate" and flat["bytes"] > 10_000
    published = ResultStore(result["manifest_uri"].rsplit("/", 1)[0])
    png = published.get_bytes(flat["path"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    # shown in the report, beside the other pictures of the feature space
    report = (Path(result["local_dir"]) / "report.html").read_text()
    assert base64.b64encode(png).decode() in report and "flattened cortex of UTS01 (pycortex)" in report

    # the planted voxels light up where pycortex's own mapping puts them, and nowhere else
    (filestore,) = {p.parent for p in (cache / "pycortex").glob("*/UTS01")}  # the one publish made
    expected = _planted_pixels(filestore, layout["mask"], layout["ball"], HEIGHT)
    shown = _decoded(png)
    assert shown.shape == expected.shape  # the PNG's pixels are the flatmap's
    inside = np.nan_to_num(expected) > 0.5
    outside = np.isfinite(expected) & (expected == 0)
    assert inside.sum() > 200 and outside.sum() > 10 * inside.sum()
    assert np.nanmedian(shown[inside]) > 0.7  # r near the top of the (symmetric) colour scale
    assert np.nanmedian(np.abs(shown[outside])) < 0.15  # noise voxels: r near 0

    # inputs: exactly the database files a flatmap needs, verified like every other input
    keys = {i["key"] for i in manifest["inputs"]}
    assert set(database["files"]) <= keys
    assert not any(k.startswith(f"{DB}/") and k not in database["files"] for k in keys)
    # pycortex wrote its caches into the private filestore only, never beside the downloaded dataset
    assert not list(cache.rglob(f"{DB}/UTS01/cache")) and list((cache / "pycortex").glob("*/UTS01/cache/*.npz"))


@pytest.mark.slow
def test_without_pycortex_nothing_changes(layout, cache, tmp_path, results_bucket, monkeypatch, caplog):
    """``maps.pycortex`` with pycortex not importable: the analysis publishes as before, with a warning."""
    from pipelines.run import run_analysis

    monkeypatch.setitem(sys.modules, "cortex", None)  # `import cortex` fails as if it were not installed
    result = run_analysis(parse_config(config(results_bucket, tmp_path)), cache_dir=tmp_path / "cache")
    assert result["status"] == "complete"
    from pipelines.consume import read_manifest

    kinds = {a["kind"] for a in read_manifest(result["manifest_uri"])["artifacts"]}
    assert "flatmap_png" not in kinds and "statmap_tsv" in kinds and "figure_png" in kinds
    assert "'maps.pycortex' is set but pycortex is not installed" in caplog.text
    assert not (tmp_path / "cache" / "pycortex").exists()


def test_a_subject_without_a_database_is_refused_at_prepare(layout, cache, tmp_path, results_bucket):
    from pipelines.steps import prepare

    with pytest.raises(DatasetError, match=r"ds003020: no pycortex subject 'UTS03' for sub-UTS03: "
                                           r"derivative/pycortex-db/UTS03/ is not in the dataset \(pycortex subjects "
                                           r"in derivative/pycortex-db/: UTS01\)\. Fix 'maps\.pycortex\.database' or "
                                           r"'maps\.pycortex\.subject'"):
        prepare(parse_config(config(results_bucket, tmp_path, subjects=("UTS03",))), cache_dir=cache)
    with pytest.raises(DatasetError, match=r"pycortex subject 'UTS01' has no transform 'UTS01_fullhead' "
                                           r"\(derivative/pycortex-db/UTS01/transforms/UTS01_fullhead/matrices\.xfm "
                                           r"and reference\.nii\.gz; its transforms: UTS01_auto\)\. "
                                           r"Fix 'maps\.pycortex\.transform'"):
        prepare(parse_config(config(results_bucket, tmp_path, transform="{subject}_fullhead")), cache_dir=cache)
    with pytest.raises(DatasetError, match=r"transforms/UTS01_auto/mask_thin\.nii\.gz is not in the dataset: the "
                                           r"HDF5 voxels are those of a pycortex mask, and transform 'UTS01_auto' "
                                           r"has masks: thick\. Fix 'maps\.pycortex\.mask'"):
        prepare(parse_config(config(results_bucket, tmp_path, mask="thin")), cache_dir=cache)
    # the same subject, drawn on UTS01's database, passes
    cfg = parse_config(config(results_bucket, tmp_path, subjects=("UTS03",), subject="UTS01", transform="UTS01_auto"))
    assert prepare(cfg, cache_dir=cache)["subjects"] == ["UTS03"]


def test_a_voxel_count_of_no_mask_is_refused_at_ingest(layout, cache, tmp_path, results_bucket):
    """UTS02's responses have 8 voxels fewer than UTS01's thick mask: its fit stops before fitting."""
    from pipelines.steps import fit_subject

    cfg = parse_config(config(results_bucket, tmp_path, subjects=("UTS02",), subject="UTS01", transform="UTS01_auto"))
    n = layout["n_vox"]
    with pytest.raises(DatasetError, match=rf"UTS02/inamoment\.hf5: sub-UTS02's responses have {n - 8} voxels, the "
                                           rf"pycortex mask derivative/pycortex-db/UTS01/transforms/UTS01_auto/"
                                           rf"mask_thick\.nii\.gz has {n}: the columns must be that mask's voxels"):
        fit_subject(cfg, "UTS02", [], cache_dir=cache)


@pytest.mark.slow
def test_bold_volumes_on_the_reference_grid_are_sampled(layout, database, cache, tmp_path, results_bucket):
    """A volume in NIfTI order on the transform's reference grid is drawn like the masked voxels;
    bold data on another grid are refused, naming the reference."""
    import nibabel as nib

    from pipelines.flatmap import HEIGHT, check_responses, local_filestore, render_flatmap_png
    from pipelines.ingest import Run, SubjectResponses, open_dataset

    ingest = open_dataset(parse_config(config(results_bucket, tmp_path)), cache)
    # the HDF5 flatmap's filestore (the bold one is the same files less the mask): its pycortex caches are reused
    filestore, pcs = local_filestore(ingest, "UTS01", "hdf5", cache / "pycortex")
    mask = layout["mask"]  # (z, y, x)
    zyx = np.full(mask.shape, np.nan, np.float32)
    zyx[mask] = 0.0
    zyx[tuple(np.argwhere(mask)[layout["ball"]].T)] = 0.8
    png = render_flatmap_png(zyx.T, filestore, pcs, tmp_path / "bold.png", "bold")  # NIfTI order (x, y, z)
    expected = _planted_pixels(filestore, mask, layout["ball"], HEIGHT)
    shown = _decoded(png.read_bytes())
    assert np.nanmedian(shown[np.nan_to_num(expected) > 0.5]) > 0.9  # 0.8 on a scale to 0.8
    assert np.nanmedian(np.abs(shown[np.isfinite(expected) & (expected == 0)])) < 0.05  # 0 everywhere else

    ref = nib.load(str(database["files"][f"{DB}/UTS01/transforms/UTS01_auto/reference.nii.gz"]))
    run = Run(label="1", data=np.zeros((0, 0), np.float32), times=np.zeros(0), tr=2.0,
              key="sub-UTS01/ses-1/func/sub-UTS01_ses-1_task-inamoment_bold.nii.gz")
    good = SubjectResponses("UTS01", "bold", [run], ["v"], mask_img=nib.Nifti1Image(np.ones(ref.shape, np.uint8),
                                                                                      ref.affine))
    assert check_responses(ingest, "UTS01", good) == pcs
    shifted = nib.Nifti1Image(np.ones(ref.shape, np.uint8), ref.affine @ np.diag([2.0, 2.0, 2.0, 1.0]))
    with pytest.raises(DatasetError, match=r"task-inamoment_bold\.nii\.gz: sub-UTS01's bold volumes are not on the "
                                           r"grid of the pycortex transform's reference derivative/pycortex-db/UTS01/"
                                           r"transforms/UTS01_auto/reference\.nii\.gz \(the affines differ\)"):
        check_responses(ingest, "UTS01", SubjectResponses("UTS01", "bold", [run], ["v"], mask_img=shifted))
    gifti = SubjectResponses("UTS01", "gifti", [run], ["v"])
    with pytest.raises(DatasetError, match=r"'maps\.pycortex' draws voxel maps .* its responses are gifti"):
        check_responses(ingest, "UTS01", gifti)
