"""Interactive viewers (pipelines/viewers.py) in headless Chromium: they render, log no error, fetch
nothing but the page itself, and hide what lies below their threshold; the report links them."""
from __future__ import annotations

import io
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipelines import viewers
from pipelines.config import parse_config

from .test_datasets_narratives import narratives  # noqa: F401 (a fixture: Narratives' surfaces on S3)

# a canvas drawn at a non-zero size: the viewer's, once its script ran
CANVAS = ("(() => { const c = Array.from(document.querySelectorAll('canvas')).filter(c => c.width > 0 && "
          "c.height > 0 && c.clientWidth > 0 && c.clientHeight > 0); return c.length ? c.map(c => [c.width, "
          "c.height]) : null })()")
# brainsprite's overlay: the thresholded map as a sprite of slices; its drawn (opaque) pixels counted
OVERLAY_PIXELS = ("(() => { const im = document.querySelector('img[id^=overlayImg]'); if (!im || !im.complete) "
                  "return null; const c = document.createElement('canvas'); c.width = im.naturalWidth; "
                  "c.height = im.naturalHeight; const x = c.getContext('2d'); x.drawImage(im, 0, 0); "
                  "const d = x.getImageData(0, 0, c.width, c.height).data; let n = 0; "
                  "for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++; return {opaque: n}; })()")


def coloured_pixels(png: bytes) -> int:
    """Pixels of a screenshot that are clearly coloured (not grey, white or black): the map drawn."""
    from PIL import Image

    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    return int(((rgb.max(-1) - rgb.min(-1)) > 60).sum())


def viewer_config(path: Path) -> dict:
    text = Path(path).read_text()
    block = re.search(r'<script type="application/json" id="neuroflow-viewer">(.*?)</script>', text, re.S)
    assert block, f"{path} has no neuroflow-viewer block"
    return json.loads(block.group(1).replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">"))


def assert_renders_self_contained(browser, url: str, page: Path) -> dict:
    """The page at `url` draws its canvas, logs no error and requests nothing but itself and data: URIs."""
    text = page.read_text()
    assert viewers.external_references(text) == []
    # independent of viewers.py's own check: no src/href anywhere names an outside address
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text, re.I)
    seen = browser.inspect(url, CANVAS, settle_s=2.0)
    assert seen["errors"] == [], seen["errors"]
    outside = [u for u in seen["requests"] if u != url and not u.startswith("data:")]
    assert outside == [], outside
    assert seen["value"] and all(w > 0 and h > 0 for w, h in seen["value"])
    assert coloured_pixels(seen["screenshot"]) > 50, "the viewer drew no coloured map"
    return seen


def test_volume_viewer_hides_values_below_its_threshold(browser, tmp_path):
    """On its own grid (no template), the overlay's drawn pixels are exactly the voxels with
    |value| above the threshold; the threshold and colour range are in the page's config."""
    data = np.zeros((9, 10, 8), np.float32)  # 9 sagittal slices: a full 3 x 3 sprite, no unused tile
    data[2, 3, 1:6] = 0.5  # 5 voxels shown at threshold 0.1
    data[6, 2:9, 4] = -0.4  # 7 voxels shown (negative)
    data[1:5, 6:9, 6] = 0.05  # 12 voxels below 0.1: hidden, shown at 0.01
    data[8, 9, 7] = np.nan  # NaN: never shown
    img = nib.Nifti1Image(data, np.diag([3.0, 3.0, 3.0, 1.0]))
    counts = {}
    for threshold in (0.1, 0.01):
        page = viewers.volume_viewer(img, tmp_path / f"v{threshold}.html", title="planted", threshold=threshold,
                                     space="T1w")
        config = viewer_config(page)
        assert config["threshold"] == threshold and config["vmax"] == pytest.approx(0.5)
        assert config["vmin"] == pytest.approx(-0.5) and config["cmap"] == "RdBu_r"
        assert f"|value| &lt; {threshold:g} not shown" in page.read_text()
        url = page.as_uri()
        assert_renders_self_contained(browser, url, page)
        counts[threshold] = browser.inspect(url, OVERLAY_PIXELS, settle_s=0.0)["value"]["opaque"]
    assert counts == {0.1: 12, 0.01: 24}


def test_mni_volume_viewer_draws_the_bundled_template_and_fetches_nothing(browser, tmp_path):
    from pipelines.simulate import demo_mask

    mask = demo_mask(4.0)
    data = np.zeros(mask.shape, np.float32)
    inside = np.argwhere(np.asarray(mask.dataobj) > 0)
    data[tuple(inside[:40].T)] = 0.6
    page = viewers.volume_viewer(nib.Nifti1Image(data, mask.affine), tmp_path / "mni.html", title="mni",
                                 threshold=0.1, space="MNI152NLin2009cAsym")
    assert "MNI152 template" in viewer_config(page)["what"]
    assert_renders_self_contained(browser, page.as_uri(), page)
    again = viewers.volume_viewer(nib.Nifti1Image(data, mask.affine), tmp_path / "again.html", title="mni",
                                  threshold=0.1, space="MNI152NLin2009cAsym")
    assert again.read_bytes() == page.read_bytes()  # deterministic: a re-run publishes the same bytes


def test_surface_viewer_renders_both_hemispheres_with_threshold_and_colour_bar(browser, tmp_path):
    """fsaverage6 values (the nested fsaverage5 vertices shown) in niivue: WebGL canvas, colour bar."""
    rng = np.random.default_rng(3)
    n = 40962
    r = np.where(rng.random(2 * n) < 0.3, rng.uniform(-0.6, 0.6, 2 * n), 0.02).astype(np.float32)
    arrays = {"r": r, "info__hemi": np.array(["L"] * n + ["R"] * n), "info__vertex": np.r_[np.arange(n), np.arange(n)]}
    page, caption = viewers.feature_viewers("gifti", arrays, None, "r", tmp_path / "s.html", title="surface",
                                            threshold=0.2, space="fsaverage6")
    assert page is not None and "surface" in caption
    config = viewer_config(page)
    assert config["threshold"] == 0.2 and config["vmax"] == pytest.approx(float(np.abs(r[:10242]).max()), rel=1e-5)
    text = page.read_text()
    assert "cal_min: 0.2" in text  # niivue's layer: values below the threshold are not coloured
    assert "nv.opts.isColorbar = true" in text
    assert_renders_self_contained(browser, page.as_uri(), page)
    # not an fsaverage mesh: no viewer, and why
    other = {**arrays, "info__vertex": np.r_[np.arange(100), np.arange(100)], "r": r[:200],
             "info__hemi": np.array(["L"] * 100 + ["R"] * 100)}
    assert viewers.feature_viewers("gifti", other, None, "r", tmp_path / "o.html", title="o", threshold=0.1,
                                   space=None) == (None, viewers.NOT_FSAVERAGE)
    assert not (tmp_path / "o.html").exists()


def test_a_page_that_would_fetch_is_refused_and_nilearns_favicon_is_inlined():
    from pipelines.errors import IntegrityError

    page = ('<html><head><link rel="icon" type="image/x-icon" href="https://raw.githubusercontent.com/x.ico" />'
            '</head><body></body></html>')
    assert "https://" not in viewers.self_contained(page, "p.html")
    for bad in ('<script src="https://cdn.plot.ly/plotly.min.js"></script>', '<img src="//cdn.example/x.png">',
                '<link rel="stylesheet" href="http://x/y.css">', '<style>a{background:url("https://x/y.png")}</style>'):
        with pytest.raises(IntegrityError, match=r"viewer page p\.html would load .* maps\.viewers\.enabled"):
            viewers.self_contained(f"<html><head>{bad}</head><body></body></html>", "p.html")


# --- end to end: the demo analysis (sim01: MNI volume; sub-18: six ROIs) ----------------------------------

@pytest.fixture(scope="module")
def published(openneuro_demo, tiny_bert_dir, tmp_path_factory, s3_url):
    from pipelines.run import run_analysis

    from .conftest import demo_config, make_bucket

    make_bucket("viewer-results")
    cfg = parse_config(demo_config(tiny_bert_dir, "s3://viewer-results"))
    result = run_analysis(cfg, cache_dir=tmp_path_factory.mktemp("cache"))
    return cfg, result


@pytest.mark.integration
@pytest.mark.slow
def test_published_report_links_a_viewer_per_volume_map_that_renders(published, browser):
    from pipelines.consume import read_manifest
    from pipelines.resultstore import ResultStore
    from pipelines.s3 import split_s3_uri

    cfg, result = published
    manifest = read_manifest(result["manifest_uri"])
    views = [a for a in manifest["artifacts"] if a["kind"] == "viewer_html"]
    # one per feature space of the volume subject; the ROI subject has none
    assert sorted((a["subject"], a["feature_space"], a["stat"]) for a in views) == [
        ("sim01", "minilmL4", "r"), ("sim01", "wordrate", "r")]
    assert all(a["path"].startswith("sub-sim01/viewers/") and a["path"].endswith("_stat-r_viewer.html")
               for a in views)
    local = Path(result["local_dir"])
    report = Path(result["report_path"])
    html = report.read_text()
    assert "brainsprite" not in html and "niivue" not in html  # linked, not embedded: the report stays small
    assert report.stat().st_size < 2_000_000
    assert "No interactive viewer" in html  # sub-18's regions
    # the links the reader clicks, resolved by the browser, are the published viewers
    links = browser.inspect(report.as_uri(), "Array.from(document.querySelectorAll('p.viewer a')).map(a => a.href)",
                            settle_s=0.0)
    assert links["errors"] == []
    assert sorted(links["value"]) == sorted((local / a["path"]).as_uri() for a in views)
    for art in views:
        page = local / art["path"]
        config = viewer_config(page)
        assert config["threshold"] == cfg.maps.viewers.threshold == 0.1
        assert "MNI152 template" in config["what"]
        assert_renders_self_contained(browser, page.as_uri(), page)
    # served from S3 as HTML, it renders the same and still fetches nothing else
    store = ResultStore(cfg.publish_prefix)
    bucket, key = split_s3_uri(f"{cfg.publish_prefix}/{views[0]['path']}")
    head = store.client.head_object(Bucket=bucket, Key=key)
    assert head["ContentType"] == "text/html"
    url = store.client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=300)
    seen = browser.inspect(url, CANVAS, settle_s=1.0)
    assert seen["errors"] == [] and [u for u in seen["requests"] if u != url and not u.startswith("data:")] == []


@pytest.mark.integration
@pytest.mark.slow
def test_viewers_can_be_left_out(openneuro_demo, tiny_bert_dir, results_bucket, tmp_path):
    from pipelines.consume import read_manifest
    from pipelines.run import run_analysis

    from .conftest import demo_config

    raw = demo_config(tiny_bert_dir, results_bucket, subjects=("sim01",))
    raw["features"] = raw["features"][:1]
    default = parse_config(raw)
    cfg = parse_config({**raw, "maps": {"viewers": {"enabled": False}}})
    assert cfg.analysis_id != default.analysis_id  # a different report: a different analysis
    assert "maps" not in default.to_dict()  # default viewers leave the ids of existing analyses as they were
    result = run_analysis(cfg, cache_dir=tmp_path / "cache")
    manifest = read_manifest(result["manifest_uri"])
    assert not [a for a in manifest["artifacts"] if a["kind"] == "viewer_html"]
    assert "interactive viewer" not in Path(result["report_path"]).read_text()


@pytest.mark.integration
@pytest.mark.slow
def test_group_page_links_a_viewer_of_the_group_volume(s3_url, results_bucket, tmp_path, monkeypatch, browser):
    """An MNI cohort's group page links the viewer of each feature space's group r; it renders."""
    from pipelines.consume import read_manifest
    from pipelines.steps import run_analysis

    from .test_group_space import _bold_cohort, _bold_config

    monkeypatch.setenv("NEUROFLOW_CACHE", str(tmp_path / "cache"))
    labels = _bold_cohort(tmp_path / "ds", 3, np.random.default_rng(7), space="MNI152NLin2009cAsym")
    cfg = parse_config(_bold_config(tmp_path / "ds", results_bucket, labels, {}))
    result = run_analysis(cfg, local_dir=tmp_path / "out")
    manifest = read_manifest(f"{cfg.publish_prefix}/manifest.json")
    assert manifest["group"]["status"] == "ok" and manifest["group"]["kind"] == "volume"
    group_views = [a for a in manifest["artifacts"] if a["kind"] == "viewer_html" and a["subject"] == "group"]
    assert [(a["feature_space"], a["stat"]) for a in group_views] == [("wordrate", "mean_r")]
    assert len([a for a in manifest["artifacts"] if a["kind"] == "viewer_html"]) == 1 + len(labels)
    local = Path(result["local_dir"])
    page = local / "sub-group/report.html"
    links = browser.inspect(page.as_uri(), "Array.from(document.querySelectorAll('a')).map(a => a.href)"
                            ".filter(h => h.endsWith('_viewer.html'))", settle_s=0.0)
    assert links["value"] == [(local / group_views[0]["path"]).as_uri()]
    viewer = local / group_views[0]["path"]
    assert viewer_config(viewer)["title"] == "group wordrate: Fisher-z mean r"
    assert_renders_self_contained(browser, viewer.as_uri(), viewer)


@pytest.mark.integration
@pytest.mark.slow
def test_surface_analysis_publishes_a_surface_viewer_that_renders(narratives, results_bucket, tmp_path, browser):
    """Narratives' pieman on fsaverage6: the report links a niivue viewer of r on both hemispheres."""
    from pipelines.consume import read_manifest
    from pipelines.run import run_analysis

    from .conftest import demo_config
    from .test_datasets_narratives import RESPONSES, SOURCE, WORDS

    raw = demo_config(tmp_path, results_bucket, subjects=("001",))
    raw["dataset"].update(source=SOURCE, version="1.1.4", task="pieman", responses={**RESPONSES, "stories": ["pieman"]},
                          word_timings=WORDS)
    raw["features"] = [{"name": "wordrate", "kind": "word_rate"}]
    raw["model"] = {"cv": "contiguous_blocks", "n_folds": 4, "delays": [0, 1], "alphas": [0.1, 1, 10, 100, 1000]}
    result = run_analysis(parse_config(raw), cache_dir=tmp_path / "cache", local_dir=tmp_path / "out")
    manifest = read_manifest(result["manifest_uri"])
    (view,) = [a for a in manifest["artifacts"] if a["kind"] == "viewer_html"]
    assert view["path"] == "sub-001/viewers/sub-001_task-pieman_space-fsaverage6_desc-wordrate_stat-r_viewer.html"
    local = Path(result["local_dir"])
    report = (local / "report.html").read_text()
    assert f'href="{view["path"]}"' in report and "niivue" not in report
    page = local / view["path"]
    config = viewer_config(page)
    assert "both hemispheres" in config["what"] and config["threshold"] == 0.1
    assert config["vmax"] > 0.5  # the planted vertices (0-4 on both hemispheres, all among fsaverage5's)
    assert_renders_self_contained(browser, page.as_uri(), page)


def test_a_map_with_nothing_to_show_is_an_empty_viewer_not_an_error(browser, tmp_path):
    """All NaN (no target fitted) or all below the threshold: the viewer opens, draws no map, logs nothing."""
    # 9 sagittal slices: a full 3 x 3 sprite (nilearn draws the unused tiles of a partly filled sprite)
    empty = viewers.volume_viewer(nib.Nifti1Image(np.full((9, 6, 4), np.nan, np.float32), np.eye(4)),
                                  tmp_path / "nan.html", title="nan", threshold=0.1, space=None)
    n = 10242
    arrays = {"r": np.full(2 * n, 0.05, np.float32), "info__hemi": np.array(["L"] * n + ["R"] * n),
              "info__vertex": np.r_[np.arange(n), np.arange(n)]}
    below, _ = viewers.feature_viewers("gifti", arrays, None, "r", tmp_path / "below.html", title="below",
                                       threshold=0.1, space="fsaverage5")
    for page in (empty, below):
        seen = browser.inspect(page.as_uri(), CANVAS, settle_s=1.0)
        assert seen["errors"] == [] and seen["value"]
    assert browser.inspect(empty.as_uri(), OVERLAY_PIXELS, settle_s=0.0)["value"]["opaque"] == 0


def test_viewer_threshold_out_of_range_is_one_config_error(tiny_bert_dir):
    from pipelines.errors import ConfigError

    from .conftest import demo_config

    raw = demo_config(tiny_bert_dir, "s3://unused")
    with pytest.raises(ConfigError, match=r"maps\.viewers\.threshold"):
        parse_config({**raw, "maps": {"viewers": {"threshold": 1.5}}})
    with pytest.raises(ConfigError, match=r"thresold"):
        parse_config({**raw, "maps": {"viewers": {"thresold": 0.2}}})


@pytest.mark.slow
def test_bench_viewers_writes_its_table(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "viewers.md"
    subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "bench" / "bench_viewers.py"),
                    "--quick", "--out", str(out)], check=True, capture_output=True)
    rows = [line for line in out.read_text().splitlines() if line.startswith(("| volume", "| surface"))]
    assert len(rows) == 2 and all(float(r.split("|")[-2]) > 0.05 for r in rows)  # MB per page


def test_subject_pages_link_their_viewers_relative_to_themselves(browser, tmp_path):
    """Past 20 subjects each subject's page (sub-X/report.html) links sub-X/viewers/...; the index links
    none; a viewer page outside the report's folder is refused by name."""
    from pipelines.errors import NeuroflowError
    from pipelines.report import render_report, render_report_pages

    from pipelines.maps import render_targets_png

    img = nib.Nifti1Image(np.pad(np.full((3, 3, 3), 0.4, np.float32), 3), np.diag([3.0, 3.0, 3.0, 1.0]))
    page = viewers.volume_viewer(img, tmp_path / "sub-01" / "viewers" / "v.html", title="v", threshold=0.1,
                                 space=None)
    png = render_targets_png(["a", "b"], np.array([0.1, 0.2]), tmp_path / "x.png", "x")
    feature = {"name": "wordrate", "metrics": {"mean_r": 0.1}, "images": [{"path": str(png), "caption": "x"}],
               "viewers": [{"path": str(page), "caption": "wordrate: slices"}]}
    report = {"title": "t", "dataset": {"id": "ds", "version": "1"}, "analysis_id": "a",
              "subjects": [{"label": "01", "page": "sub-01/report.html", "feature_spaces": [feature]}]}
    written = render_report_pages(report, tmp_path / "report.html")
    subject_page = next(p for p, sub in written if sub == "01")
    assert 'href="viewers/v.html"' in subject_page.read_text()
    assert "v.html" not in (tmp_path / "report.html").read_text()
    links = browser.inspect(subject_page.as_uri(),
                            "Array.from(document.querySelectorAll('p.viewer a')).map(a => a.href)", settle_s=0.0)
    assert links["value"] == [page.as_uri()]
    outside = viewers.volume_viewer(img, tmp_path.parent / f"{tmp_path.name}-elsewhere.html", title="o",
                                    threshold=0.1, space=None)
    feature["viewers"] = [{"path": str(outside), "caption": "o"}]
    with pytest.raises(NeuroflowError, match=r"elsewhere\.html .*is not inside the report's folder"):
        render_report({**report, "subjects": [{"label": "01", "feature_spaces": [feature]}]}, tmp_path / "one.html")
    outside.unlink()
