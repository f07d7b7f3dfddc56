"""Interactive viewers of score maps: one self-contained HTML page per map, linked from the report.

Volumes get nilearn's :func:`nilearn.plotting.view_img` (brainsprite: three orthogonal slices,
click to move, the value under the cursor); surfaces on an fsaverage mesh get
:func:`nilearn.plotting.view_surf` with the ``niivue`` engine (WebGL, rotate and zoom) on the
inflated fsaverage5 surface bundled with nilearn. Both carry a colour bar (symmetric, ``RdBu_r``)
and a threshold: |value| below it is not drawn.

Every page is self-contained: nilearn inlines its JavaScript (jQuery, brainsprite, niivue) and
embeds the images as ``data:`` URIs; the one outside reference its template carries (a favicon on
raw.githubusercontent.com) is replaced by an empty ``data:`` icon, and :func:`self_contained`
refuses a page that still names any ``http(s)://`` source. Nothing is fetched at view time. The
pages are deterministic (brainsprite's random element ids are replaced), so a re-run publishes the
same bytes.

Why linked pages, not embedded ones: a whole-brain volume viewer is 0.8-1 MB over the MNI template
(its slices as PNG sprites) and a surface viewer 3.55 MB (2.2 MB of it niivue; bench/results/viewers.md),
so embedding every map would multiply the report's size; the report (and the group page) links each
subject's and feature space's viewer of r instead and stays small. Only r (and the group's Fisher-z
mean r) gets a viewer: a threshold on |value| means nothing for alpha or p, whose maps remain as
NIfTI / GIFTI. Electrodes, regions and sensors have no brain volume or surface: no viewer, and the
report says so (:data:`NO_VIEWER`).
"""
from __future__ import annotations

import html as html_lib
import json
import re
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np

from .errors import IntegrityError

__all__ = ["NO_VIEWER", "VIEWER_KIND", "external_references", "feature_viewers", "self_contained",
           "surface_viewer", "viewer_name", "volume_viewer"]

VIEWER_KIND = "viewer_html"  # the manifest kind of a viewer page
NO_VIEWER = ("No interactive viewer: these targets (electrodes, regions, sensors or voxels without a volume "
             "grid) have no brain volume or surface to show them on; see the table and the pictures.")
NOT_FSAVERAGE = "No interactive viewer: the surface is not an fsaverage mesh (the GIFTI maps remain)."

_BRAINSPRITE_ID = re.compile(r'id="div_viewer-([0-9a-f]{32})"')
_FAVICON = re.compile(r"<link\s+rel=\"icon\"[^>]*>", re.S)
_EXTERNAL = re.compile(r"""<(?:script|link|img|iframe|source|video|audio|embed|object)\b[^>]*?"""
                       r"""\b(?:src|href|data)\s*=\s*["']?\s*((?:https?:)?//[^"'\s>]*)""", re.I | re.S)
_CSS_URL = re.compile(r"""url\(\s*["']?\s*((?:https?:)?//[^"')\s]*)""", re.I)
# nilearn 0.14's niivue page adds a listener to the canvas in <head>, before the canvas exists
# (a TypeError in the console); as a module script it runs once the page is parsed.
_NIIVUE_EARLY = re.compile(r"<script>(\s*document\.getElementById\(\"gl\"\)\.addEventListener)")


def external_references(html: str) -> list[str]:
    """Every ``http(s)://`` (or protocol-relative) address a page would load: script, link, img,
    iframe, media ``src``/``href`` and CSS ``url()``."""
    return [m.group(1) for m in _EXTERNAL.finditer(html)] + [m.group(1) for m in _CSS_URL.finditer(html)]


def self_contained(html: str, where: str) -> str:
    """`html` with nilearn's outside favicon replaced by an empty ``data:`` icon (and brainsprite's
    random element ids by a fixed one: one viewer per page); an IntegrityError
    naming `where` if any other outside address is left (a nilearn that fetches at view time)."""
    html = _FAVICON.sub('<link rel="icon" href="data:,">', html)
    uid = _BRAINSPRITE_ID.search(html)  # a random uuid per call: a re-run would publish different bytes
    if uid:
        html = html.replace(uid.group(1), "neuroflow")
    html = _NIIVUE_EARLY.sub(r'<script type="module">\1', html)
    found = external_references(html)
    if found:
        raise IntegrityError(f"viewer page {where} would load {found[0]} at view time; this nilearn version "
                             "does not inline its viewer; pin nilearn as in requirements.lock or set "
                             "maps.viewers.enabled: false")
    return html


def viewer_name(map_name: str) -> str:
    """The viewer page's file name for a map file name (``..._statmap.nii.gz`` -> ``..._viewer.html``)."""
    stem = re.sub(r"(_statmap)?(\.nii\.gz|\.nii|\.func\.gii|\.tsv)$", "", map_name)
    return f"{stem}_viewer.html"


def _vmax(values: np.ndarray) -> float:
    finite = np.abs(values[np.isfinite(values)])
    return float(finite.max()) if finite.size and finite.max() > 0 else 1.0


def _page(html: str, path: Path, title: str, what: str, threshold: float, vmax: float) -> Path:
    """Add neuroflow's heading (what is shown, the threshold, the colour bar's range, as text and as
    JSON in ``#neuroflow-viewer``) after <body>, check the page is self-contained, write it."""
    config = {"title": title, "threshold": threshold, "vmax": vmax, "vmin": -vmax, "cmap": "RdBu_r",
              "what": what}
    head = (f'<div id="neuroflow-viewer-head" style="font-family:sans-serif;font-size:13px;padding:4px 8px">'
            f"<strong>{html_lib.escape(title)}</strong> &middot; {html_lib.escape(what)} &middot; "
            f"|value| &lt; {threshold:g} not shown &middot; colour bar {-vmax:.3g} to {vmax:.3g}</div>"
            f'<script type="application/json" id="neuroflow-viewer">'
            f"{html_lib.escape(json.dumps(config), quote=False)}</script>")
    body = re.compile(r"<body[^>]*>").search(html, html.rfind("</head>") + 1)  # inlined js may say "<body"
    if "</head>" not in html or body is None:
        raise IntegrityError(f"viewer page {path.name}: nilearn's page has no <head> and <body>")
    html = html[:body.end()] + head + html[body.end():]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(self_contained(html, path.name), encoding="utf-8")
    return path


def volume_viewer(img: nib.Nifti1Image | str | Path, path: str | Path, *, title: str, threshold: float,
                  space: str | None) -> Path:
    """Write the interactive slice viewer of a 3-D volume map.

    Parameters
    ----------
    img : Nifti1Image or path
        The map (NaN is drawn as 0, i.e. not shown).
    path : str or Path
        The HTML page to write.
    title : str
        Shown above the viewer.
    threshold : float
        |value| below it is not shown.
    space : str or None
        The map's space: on an MNI space the MNI152 template (bundled with nilearn) is drawn
        beneath; otherwise the map is drawn alone on its own grid (it is not on the template).

    Returns
    -------
    Path
        The written page.
    """
    from nilearn import plotting

    img = nib.load(str(img)) if isinstance(img, (str, Path)) else img
    data = np.nan_to_num(np.asarray(img.dataobj, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    vmax = _vmax(data)
    img = nib.Nifti1Image(data, img.affine)
    on_mni = bool(space) and str(space).upper().startswith("MNI")
    with warnings.catch_warnings():  # nothing above threshold is a valid (empty) viewer
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        view = plotting.view_img(img, bg_img="MNI152" if on_mni else False, threshold=float(threshold),
                                 vmax=vmax, cmap="RdBu_r", symmetric_cmap=True, colorbar=True, title=title,
                                 black_bg=True, resampling_interpolation="nearest")
    what = "slices over the MNI152 template" if on_mni else f"slices on the map's own grid ({space or 'no space'})"
    return _page(view.get_standalone(), Path(path), title, what, float(threshold), vmax)


def surface_viewer(by_hemi: dict[str, np.ndarray], path: str | Path, *, title: str,
                   threshold: float) -> Path | None:
    """Write the interactive 3-D viewer of a surface map on the inflated fsaverage5 surfaces.

    ``by_hemi`` maps ``"L"``/``"R"`` to full-length per-vertex arrays on an fsaverage mesh
    (fsaverage5, 6 or 7: the first 10,242 vertices are fsaverage5's; NaN is not shown). Returns
    None when the maps are not on an fsaverage mesh.
    """
    from nilearn import datasets, plotting
    from nilearn.surface import PolyMesh, SurfaceImage

    from .maps import surface_view_values

    views = {h: surface_view_values(v) for h, v in by_hemi.items()}
    if not views or any(v is None for v in views.values()):
        return None
    fsaverage = datasets.load_fsaverage("fsaverage5")
    parts = {"L": "left", "R": "right"}
    hemis = [h for h in ("L", "R") if h in views]
    mesh = PolyMesh(**{parts[h]: fsaverage["inflated"].parts[parts[h]] for h in hemis})
    values = {parts[h]: np.nan_to_num(views[h], nan=0.0, posinf=0.0, neginf=0.0) for h in hemis}
    vmax = _vmax(np.concatenate(list(values.values())))
    sulcal = fsaverage_sulcal(hemis)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        view = plotting.view_surf(surf_map=SurfaceImage(mesh=mesh, data=values), bg_map=sulcal,
                                  hemi="both" if len(hemis) == 2 else parts[hemis[0]],
                                  threshold=float(threshold), vmax=vmax, cmap="RdBu_r", symmetric_cmap=True,
                                  colorbar=True, title=title, engine="niivue", title_fontsize=16)
    what = "inflated fsaverage5 surface" + (" (both hemispheres)" if len(hemis) == 2 else f" ({parts[hemis[0]]})")
    return _page(view.get_standalone(), Path(path), title, what, float(threshold), vmax)


def fsaverage_sulcal(hemis: list[str]):
    """The sulcal depth of fsaverage5 as a SurfaceImage over the given hemispheres (the grey beneath)."""
    from nilearn import datasets
    from nilearn.surface import PolyMesh, SurfaceImage

    sulcal = datasets.load_fsaverage_data(mesh="fsaverage5", mesh_type="inflated", data_type="sulcal")
    parts = {"L": "left", "R": "right"}
    mesh = PolyMesh(**{parts[h]: sulcal.mesh.parts[parts[h]] for h in hemis})
    return SurfaceImage(mesh=mesh, data={parts[h]: np.asarray(sulcal.data.parts[parts[h]]) for h in hemis})


def _surface_by_hemi(values: np.ndarray, hemi: np.ndarray, vertex: np.ndarray,
                     n_vertices: dict[str, int] | int) -> dict[str, np.ndarray]:
    """Per hemisphere, a full-length array (NaN where no target) from one value per target."""
    out = {}
    for h in sorted(set(hemi.astype(str))):
        rows = hemi.astype(str) == h
        n = n_vertices[h] if isinstance(n_vertices, dict) else n_vertices
        full = np.full(int(n), np.nan, dtype=np.float32)
        full[vertex[rows].astype(np.int64)] = values[rows]
        out[h] = full
    return out


def feature_viewers(kind: str, arrays: dict[str, np.ndarray], mask_img: nib.Nifti1Image | None, values_key: str,
                    page: Path, *, title: str, threshold: float, space: str | None,
                    n_vertices: dict[str, int] | int | None = None) -> tuple[Path | None, str]:
    """One map's viewer page, from the fit's (or group's) arrays, when it has a volume or surface.

    Parameters
    ----------
    kind : str
        ``"bold"`` / ``"volume"``: values are the voxels of `mask_img`; ``"gifti"`` /
        ``"surface"``: values are vertices (``info__hemi``, ``info__vertex`` in `arrays`); any
        other kind (timeseries, hdf5, meg, ieeg, eeg, targets) has no viewer.
    arrays : dict
        The result's arrays; ``arrays[values_key]`` holds one value per target.
    mask_img : Nifti1Image or None
        The brain mask of volume results.
    page : Path
        The page to write.
    n_vertices : dict or int, optional
        Vertices per hemisphere (default: from the fsaverage family by ``space``, else the largest
        vertex index + 1).

    Returns
    -------
    (Path or None, str)
        The written page and its caption, or None and the reason there is none.
    """
    from .maps import FSAVERAGE_VERTICES, mask_bool

    values = np.asarray(arrays[values_key], dtype=np.float32)
    if kind in ("bold", "volume") and mask_img is not None:
        mask = mask_bool(mask_img)
        data = np.zeros(mask.shape, dtype=np.float32)
        data[mask] = values
        path = volume_viewer(nib.Nifti1Image(data, mask_img.affine), page, title=title, threshold=threshold,
                             space=space)
        return path, "interactive slices (threshold, colour bar, value under the cursor)"
    if kind in ("gifti", "surface") and "info__hemi" in arrays:
        vertex = arrays["info__vertex"].astype(np.int64)
        n = n_vertices if n_vertices is not None else FSAVERAGE_VERTICES.get(space or "", int(vertex.max()) + 1)
        path = surface_viewer(_surface_by_hemi(values, arrays["info__hemi"], vertex, n), page, title=title,
                              threshold=threshold)
        if path is None:
            return None, NOT_FSAVERAGE
        return path, "interactive 3-D surface (threshold, colour bar; drag to rotate)"
    return None, NO_VIEWER
