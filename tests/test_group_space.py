"""Common spaces and ROI tables of the group level: volumes (MNI, subject space with and without a
transform), template surfaces and named targets, on maps whose values are known."""
from __future__ import annotations

import gzip
import io
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from pipelines.config import parse_config
from pipelines.consume import read_manifest
from pipelines.errors import DatasetError
from pipelines.group.roi import atlas_from_surfaces, atlas_from_table, atlas_from_volume, roi_table
from pipelines.group.space import SubjectMaps, common_space
from pipelines.group.step import read_transform
from pipelines.resultstore import ResultStore

from .datasets.cohort import DERIVATIVE, TASK, build_cohort, cohort_config

SHAPE = (4, 4, 3)


def _volume_subject(label: str, r_grid: np.ndarray, mask: np.ndarray, space: str | None,
                    affine: np.ndarray | None = None) -> SubjectMaps:
    affine = np.diag([3.0, 3.0, 3.0, 1.0]) if affine is None else affine
    r = r_grid[mask].astype(np.float32)
    return SubjectMaps(label, "bold", space, {"target_names": np.array([f"voxel{i}" for i in range(r.size)]),
                                              "lm__r": r, "lm__valid": np.ones(r.size, bool)},
                       nib.Nifti1Image(mask.astype(np.uint8), affine))


def test_mni_volumes_on_one_grid_keep_each_subjects_voxels(rng):
    grids = [rng.uniform(-0.2, 0.6, SHAPE) for _ in range(3)]
    masks = [np.ones(SHAPE, bool) for _ in range(3)]
    masks[1][0, 0, 0] = False  # one voxel missing in one subject: out of the group map
    subjects = [_volume_subject(f"s{i}", g, m, "MNI152NLin2009cAsym") for i, (g, m) in enumerate(zip(grids, masks))]
    common = common_space(subjects)
    assert common.kind == "volume" and common.n_targets == int(np.prod(SHAPE)) - 1
    inside = np.asarray(common.mask_img.dataobj).astype(bool)
    assert not inside[0, 0, 0]
    for i, g in enumerate(grids):
        assert np.allclose(common.values["lm"][i], g[inside])
        assert np.allclose(_r(subjects[i])[common.index[f"s{i}"]], g[inside])


def _r(s: SubjectMaps) -> np.ndarray:
    return s.arrays["lm__r"]


def test_subject_space_volumes_without_a_transform_get_no_group_map_and_the_reason(rng):
    subjects = [_volume_subject(f"s{i}", rng.uniform(size=SHAPE), np.ones(SHAPE, bool), None) for i in range(3)]
    why = common_space(subjects)
    assert isinstance(why, str)
    assert "sub-s0: volumes in subject (native) space and no 'group.transform'" in why
    subjects[0].space = "T1w"
    assert "space-T1w" in common_space(subjects)


def test_subject_space_volumes_move_through_their_affines(rng):
    base = rng.uniform(-0.2, 0.6, (6, 4, 3))
    shifted = np.roll(base, -1, axis=0)  # this subject's voxel i is the first subject's voxel i + 1
    mask = np.ones(base.shape, bool)
    one = _volume_subject("a", base, mask, None)
    two = _volume_subject("b", shifted, mask, None)
    three = _volume_subject("c", base, mask, None)
    move = np.eye(4)
    move[0, 3] = 3.0  # world x + 3 mm: one voxel
    one.transform, two.transform, three.transform = np.eye(4), move, np.eye(4)
    common = common_space([one, two, three])
    assert common.kind == "volume" and common.index is None and "resampled" in common.how
    inside = np.asarray(common.mask_img.dataobj).astype(bool)
    assert inside.sum() == 5 * 4 * 3  # the last x slice has no voxel of the moved subject
    for row in common.values["lm"]:
        assert np.allclose(row, base[inside], atol=1e-5)


def test_transforms_that_are_not_affines_give_a_reason_or_one_error(tmp_path):
    why = read_transform(tmp_path / "sub-01_from-T1w_to-MNI152NLin2009cAsym_mode-image_xfm.h5", "x.h5")
    assert isinstance(why, str) and "ANTs/ITK" in why and "4x4" in why
    bad = tmp_path / "bad.txt"
    bad.write_text("1 0 0\n0 1 0\n")
    with pytest.raises(DatasetError, match="bad.txt: 'group.transform' must be a 4x4 affine"):
        read_transform(bad, "bad.txt")
    good = tmp_path / "good.txt"
    good.write_text("1 0 0 2\n0 1 0 0\n0 0 1 0\n0 0 0 1\n")
    assert read_transform(good, "good.txt")[0, 3] == 2


def test_roi_table_of_a_label_volume_equals_numpy(rng):
    grids = [rng.uniform(-0.2, 0.6, SHAPE) for _ in range(4)]
    subjects = [_volume_subject(f"s{i}", g, np.ones(SHAPE, bool), "MNI152NLin2009cAsym") for i, g in enumerate(grids)]
    common = common_space(subjects)
    labels = rng.integers(0, 4, SHAPE)
    atlas = atlas_from_volume(common, nib.Nifti1Image(labels.astype(np.int16), np.diag([3.0, 3.0, 3.0, 1.0])),
                              {1: "one", 2: "two", 3: "three"}, "atlas.nii.gz")
    table = roi_table(common, atlas, n_permutations=1000)
    for i, g in enumerate(grids):
        for label, name in ((1, "one"), (2, "two"), (3, "three")):
            row = table[(table.subject == f"s{i}") & (table.roi == name)].iloc[0]
            assert row.mean_r == pytest.approx(g[labels == label].mean())
            assert row.n_targets == (labels == label).sum()
    means = np.array([[g[labels == k].mean() for k in (1, 2, 3)] for g in grids])
    group = table[table.subject == "group"].set_index("roi")
    assert np.allclose(group.loc[["one", "two", "three"], "mean_r"], np.tanh(np.arctanh(means).mean(0)))
    assert (group["p"] >= 1 / 16).all()  # 4 subjects: 16 sign patterns, exact


def test_template_surfaces_share_their_vertices_and_a_label_surface(rng):
    n = 10242  # fsaverage5

    def subject(label, vertices):
        vertices = np.asarray(vertices)
        r = rng.uniform(size=2 * vertices.size).astype(np.float32)
        return SubjectMaps(label, "gifti", "fsaverage5", {
            "target_names": np.array([f"{h}:{v}" for h in "LR" for v in vertices]),
            "info__hemi": np.repeat(["L", "R"], vertices.size), "info__vertex": np.tile(vertices, 2),
            "lm__r": r, "lm__valid": np.ones(r.size, bool)})

    subjects = [subject("a", range(0, 50)), subject("b", range(10, 60)), subject("c", range(0, 60))]
    common = common_space(subjects)
    assert common.kind == "surface" and common.n_targets == 2 * 40 and common.n_vertices == {"L": n, "R": n}
    for s, row in zip(subjects, common.values["lm"]):
        lookup = dict(zip(s.arrays["target_names"], s.arrays["lm__r"]))
        assert np.allclose(row, [lookup[t] for t in common.target_names])
    labels = {h: (np.arange(n) % 3) for h in "LR"}
    atlas = atlas_from_surfaces(common, labels, None, "atlas.{hemi}.label.gii")
    table = roi_table(common, atlas, n_permutations=100)
    r0 = common.values["lm"][0]
    assert table[(table.subject == "a") & (table.label == 1)].mean_r.iloc[0] == pytest.approx(
        r0[atlas.labels == 1].mean())
    with pytest.raises(DatasetError, match="hemisphere L has 5 labels"):
        atlas_from_surfaces(common, {"L": np.zeros(5), "R": np.zeros(n)}, None, "atlas")
    subjects[2].space = "fsnative"
    assert "template surface" in common_space(subjects)


def test_named_targets_electrodes_and_mixed_kinds(rng):
    def named(label, names, kind="timeseries"):
        r = rng.uniform(size=len(names)).astype(np.float32)
        return SubjectMaps(label, kind, None, {"target_names": np.array(names), "lm__r": r,
                                               "lm__valid": np.ones(len(names), bool)})

    common = common_space([named("a", ["x", "y", "z"]), named("b", ["z", "y", "w"]), named("c", ["y", "z"])])
    assert common.target_names == ["y", "z"]
    with pytest.raises(DatasetError, match="targets \\['q'\\] are not among"):
        atlas_from_table(common, pd.DataFrame({"target": ["q"], "roi": ["r"]}), "atlas.tsv")
    assert "electrodes differ" in common_space([named(s, ["e1"], "ieeg") for s in "abc"])
    assert "different kinds" in common_space([named("a", ["x"]), named("b", ["x"], "meg")])


# --- volumes end to end ---------------------------------------------------------------------------


def _bold_cohort(dest: Path, n: int, rng, *, space: str | None = None, shift: tuple[str, ...] = ()) -> list[str]:
    """The cohort's subjects as 4-D volumes (4x4x3): voxels (1,1,1) and (2,2,1) carry the planted ROI time
    courses, the rest noise. Subjects in `shift` are one voxel further along x (x + 3 mm in the world)."""
    labels = build_cohort(dest, n, n_targets=2)
    for label in labels:
        table = pd.read_csv(dest / DERIVATIVE / f"sub-{label}/func/sub-{label}_task-{TASK}_desc-roi_timeseries.tsv",
                            sep="\t")
        vol = 100 + rng.standard_normal((*SHAPE, len(table)))
        vol[1, 1, 1], vol[2, 2, 1] = table["ROI1"], table["ROI1"] + 0.5 * rng.standard_normal(len(table))
        affine = np.diag([3.0, 3.0, 3.0, 1.0])
        if label in shift:
            vol = np.roll(vol, 1, axis=0)  # voxel i + 1 here is voxel i of the others ...
            affine[0, 3] = -3.0  # ... and sits at the same place in the scanner's world
        img = nib.Nifti1Image(vol.astype(np.float32), affine)
        img.header.set_zooms((3.0, 3.0, 3.0, 2.0))
        ent = f"_space-{space}" if space else ""
        nib.save(img, str(dest / f"sub-{label}" / f"sub-{label}_task-{TASK}{ent}_bold.nii.gz"))
    return labels


def _nii(store: ResultStore, rel: str) -> np.ndarray:
    return np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(store.get_bytes(rel))).dataobj, dtype=np.float64)


def _bold_config(source: Path, output: str, labels: list[str], group: dict) -> dict:
    raw = cohort_config(str(source), output, labels)
    raw["dataset"]["responses"] = {"kind": "bold"}
    raw["group"] = group
    return raw


@pytest.mark.integration
def test_run_analysis_refuses_a_group_map_of_subject_space_volumes_and_says_why(s3_url, results_bucket, tmp_path,
                                                                                monkeypatch, rng):
    from pipelines.steps import run_analysis

    monkeypatch.setenv("NEUROFLOW_CACHE", str(tmp_path / "cache"))
    labels = _bold_cohort(tmp_path / "ds", 3, rng)
    cfg = parse_config(_bold_config(tmp_path / "ds", results_bucket, labels, {}))
    result = run_analysis(cfg)
    assert result["status"] == "complete"
    manifest = read_manifest(f"{cfg.publish_prefix}/manifest.json")
    reason = manifest["group"]["reason"]
    assert manifest["group"]["status"] == "none" and "subject (native) space" in reason and "group.transform" in reason
    assert not [a for a in manifest["artifacts"] if a.get("subject") == "group" and a["kind"].startswith("statmap")]
    store = ResultStore(cfg.publish_prefix)
    assert "group.transform" in store.get_bytes("report.html").decode()
    assert "No group map" in store.get_bytes("sub-group/report.html").decode()


@pytest.mark.integration
def test_run_analysis_publishes_mni_group_volumes_and_an_atlas_table(s3_url, results_bucket, tmp_path, monkeypatch,
                                                                      rng):
    from pipelines.steps import run_analysis

    monkeypatch.setenv("NEUROFLOW_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "ds"
    labels = _bold_cohort(source, 4, rng, space="MNI152NLin2009cAsym")
    atlas = np.zeros(SHAPE, np.int16)
    atlas[1, 1, 1] = atlas[2, 2, 1] = 1
    atlas[0] = 2
    (source / "derivatives/atlas").mkdir(parents=True)
    nib.save(nib.Nifti1Image(atlas, np.diag([3.0, 3.0, 3.0, 1.0])), str(source / "derivatives/atlas/atlas_dseg.nii.gz"))
    (source / "derivatives/atlas/atlas_dseg.tsv").write_text("index\tname\n1\tplanted\n2\tfront\n")
    cfg = parse_config(_bold_config(source, results_bucket, labels, {
        "permutations": 1000, "atlas": "derivatives/atlas/atlas_dseg.nii.gz",
        "atlas_labels": "derivatives/atlas/atlas_dseg.tsv"}))
    run_analysis(cfg)
    manifest = read_manifest(f"{cfg.publish_prefix}/manifest.json")
    group = manifest["group"]
    assert group["status"] == "ok" and group["kind"] == "volume" and group["space"] == "MNI152NLin2009cAsym"
    store = ResultStore(cfg.publish_prefix)
    name = "sub-group/sub-group_task-alice_space-MNI152NLin2009cAsym_desc-wordrate_stat-meanr_statmap.nii.gz"
    assert name in {a["path"] for a in manifest["artifacts"]}
    gmap = _nii(store, name)
    rs = []
    for s in labels:
        sname = f"sub-{s}/sub-{s}_task-alice_space-MNI152NLin2009cAsym_desc-wordrate_stat-r_statmap.nii.gz"
        rs.append(_nii(store, sname))
    rs = np.stack(rs)
    inside = np.isfinite(rs).all(axis=0)
    assert np.allclose(gmap[inside], np.tanh(np.arctanh(rs[:, inside]).mean(0)), atol=1e-5)
    assert gmap[1, 1, 1] > 0.3 and gmap[2, 2, 1] > 0.2
    roi = pd.read_csv(io.BytesIO(store.get_bytes("sub-group/sub-group_task-alice_desc-roi_summary.tsv")), sep="\t")
    for i, s in enumerate(labels):
        for label, name in ((1, "planted"), (2, "front")):
            row = roi[(roi.subject == s) & (roi.roi == name)].iloc[0]
            assert row.mean_r == pytest.approx(rs[i][(atlas == label) & inside].mean(), abs=1e-5)
    isc = group["isc"]
    assert isc["status"] == "ok" and isc["n_with_ceiling"] >= 4  # the planted voxel, in every subject


@pytest.mark.integration
def test_run_analysis_moves_subject_space_volumes_through_given_affines(s3_url, results_bucket, tmp_path,
                                                                        monkeypatch, rng):
    from pipelines.steps import run_analysis

    monkeypatch.setenv("NEUROFLOW_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "ds"
    labels = _bold_cohort(source, 3, rng, shift=("c002",))
    (source / "derivatives/xfm").mkdir(parents=True)
    for s in labels:  # world-to-template: identity here (the shifted subject's own affine places it)
        np.savetxt(source / f"derivatives/xfm/sub-{s}_from-bold_to-MNI_affine.txt", np.eye(4))
    cfg = parse_config(_bold_config(source, results_bucket, labels, {
        "permutations": 100, "transform": "derivatives/xfm/sub-{subject}_from-bold_to-MNI_affine.txt"}))
    run_analysis(cfg)
    manifest = read_manifest(f"{cfg.publish_prefix}/manifest.json")
    group = manifest["group"]
    assert group["status"] == "ok" and "resampled" in group["how"], group
    assert group["isc"]["status"] == "none" and "resampled" in group["isc"]["reason"]
    name = "sub-group/sub-group_task-alice_space-template_desc-wordrate_stat-meanr_statmap.nii.gz"
    store = ResultStore(cfg.publish_prefix)
    gmap = _nii(store, name)
    assert gmap[1, 1, 1] > 0.3  # the planted voxel lines up across subjects through the affines
    keys = {i["key"] for i in manifest["inputs"]}
    assert all(f"derivatives/xfm/sub-{s}_from-bold_to-MNI_affine.txt" in keys for s in labels)


@pytest.mark.integration
def test_run_analysis_publishes_group_surfaces_on_fsaverage5(s3_url, results_bucket, tmp_path, monkeypatch, rng):
    from pipelines.steps import run_analysis

    from .datasets import gifti_bytes

    monkeypatch.setenv("NEUROFLOW_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "ds"
    labels = build_cohort(source, 3, n_targets=2)
    n, fitted = 10242, np.arange(0, 10242, 512)  # 21 vertices per hemisphere vary; the rest are constant
    for label in labels:
        table = pd.read_csv(source / DERIVATIVE / f"sub-{label}/func/sub-{label}_task-{TASK}_desc-roi_timeseries.tsv",
                            sep="\t")
        for h in "LR":
            data = np.full((len(table), n), 100.0, np.float32)
            data[:, fitted] = 100 + rng.standard_normal((len(table), fitted.size))
            data[:, 0] = table["ROI1"]  # vertex 0: the planted time course
            (source / f"sub-{label}" / f"sub-{label}_task-{TASK}_hemi-{h}_space-fsaverage5_bold.func.gii"
             ).write_bytes(gifti_bytes(data))
    atlas = source / "derivatives/atlas"
    atlas.mkdir(parents=True)
    for h in "LR":
        labels_h = np.where(np.arange(n) == 0, 1, 2).astype(np.int32)
        img = nib.gifti.GiftiImage(darrays=[nib.gifti.GiftiDataArray(labels_h, intent="NIFTI_INTENT_LABEL",
                                                                     datatype="NIFTI_TYPE_INT32")])
        nib.save(img, str(atlas / f"hemi-{h}_atlas.label.gii"))
    raw = cohort_config(str(source), results_bucket, labels)
    raw["dataset"]["responses"] = {"kind": "gifti"}
    raw["group"] = {"permutations": 100, "atlas": "derivatives/atlas/hemi-{hemi}_atlas.label.gii"}
    cfg = parse_config(raw)
    run_analysis(cfg)
    manifest = read_manifest(f"{cfg.publish_prefix}/manifest.json")
    group = manifest["group"]
    assert group["status"] == "ok" and group["kind"] == "surface" and group["n_targets"] == 2 * n
    assert group["metrics"]["wordrate"]["n_tested"] == 2 * fitted.size  # constant vertices: no r, no test
    paths = {a["path"] for a in manifest["artifacts"] if a.get("subject") == "group"}
    name = "sub-group/sub-group_task-alice_hemi-L_space-fsaverage5_desc-wordrate_stat-meanr_statmap.func.gii"
    assert name in paths and any(p.endswith("_surface.png") for p in paths)
    store = ResultStore(cfg.publish_prefix)
    values = nib.GiftiImage.from_bytes(store.get_bytes(name)).darrays[0].data
    assert values.shape == (n,) and values[0] > 0.3 and np.isnan(values[1])
    roi = pd.read_csv(io.BytesIO(store.get_bytes("sub-group/sub-group_task-alice_desc-roi_summary.tsv")), sep="\t")
    assert set(roi.roi) == {"label-1", "label-2"} and (roi[roi.roi == "label-1"].n_targets == 2).all()  # L and R
