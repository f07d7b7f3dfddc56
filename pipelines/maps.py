"""Score maps: write per-target statistics as NIfTI volumes or TSV tables, and draw them.

Every function is pure in the sense that it takes arrays and paths, writes one file and
returns its path. Drawing uses matplotlib's Agg backend (no display needed) and always
closes its figure.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from pipelines.errors import ConfigError, DatasetError, NeuroflowError  # noqa: E402

__all__ = [
    "bids_map_name",
    "write_volume_map",
    "write_target_table",
    "render_volume_png",
    "render_targets_png",
    "render_histogram_png",
]

_EXT_SUFFIX = {".nii.gz": "_statmap.nii.gz", ".tsv": "_statmap.tsv", ".func.gii": "_statmap.func.gii",
               ".png": "_statmap.png"}
_FIG_WIDTH_IN = 8.0
_DPI = 100  # 8 in x 100 dpi = 800 px wide


def _label(value: str, entity: str) -> str:
    """Strip a leading ``<entity>-`` and every non-alphanumeric character from a BIDS label."""
    text = str(value)
    if text.startswith(f"{entity}-"):
        text = text[len(entity) + 1:]
    clean = re.sub(r"[^A-Za-z0-9]", "", text)
    if not clean:
        raise ConfigError(f"BIDS label for '{entity}' is empty after removing non-alphanumeric characters: {value!r}")
    return clean


def bids_map_name(subject: str, task: str, space: str | None, desc: str, stat: str, ext: str) -> str:
    """Build a BIDS-Derivatives file name for a statistical map.

    Parameters
    ----------
    subject, task : str
        Labels, with or without the ``sub-``/``task-`` prefix.
    space : str or None
        Template space (e.g. ``MNI152NLin2009cAsym``); the ``space-`` entity is omitted when None.
    desc : str
        Feature-space name; non-alphanumeric characters are removed (``lm_L6`` -> ``lmL6``).
    stat : str
        Statistic (``r``, ``r2``, ``alpha``).
    ext : {".nii.gz", ".tsv"}
        File extension.

    Returns
    -------
    str
        e.g. ``sub-01_task-alice_space-MNI152NLin2009cAsym_desc-lmL6_stat-r_statmap.nii.gz``.
    """
    if ext not in _EXT_SUFFIX:
        raise ConfigError(f"map extension {ext!r} is not supported; use one of {sorted(_EXT_SUFFIX)}")
    parts = [f"sub-{_label(subject, 'sub')}", f"task-{_label(task, 'task')}"]
    if space is not None:
        parts.append(f"space-{_label(space, 'space')}")
    parts.append(f"desc-{_label(desc, 'desc')}")
    parts.append(f"stat-{_label(stat, 'stat')}")
    return "_".join(parts) + _EXT_SUFFIX[ext]


def mask_bool(mask_img: nib.Nifti1Image) -> np.ndarray:
    data = np.asanyarray(mask_img.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DatasetError(f"mask image must be 3-D, got shape {data.shape}")
    return np.nan_to_num(data) != 0


def write_volume_map(values: np.ndarray, mask_img: nib.Nifti1Image, path: str | Path) -> Path:
    """Unmask one value per voxel into a gzipped 3-D float32 NIfTI.

    Parameters
    ----------
    values : ndarray, shape (n_voxels,)
        One value per non-zero mask voxel, in C order (as ``nilearn.masking.apply_mask``).
        NaN stays NaN; voxels outside the mask are 0.
    mask_img : Nifti1Image
        The brain mask the values were extracted with; its affine and header are reused.
    path : str or Path
        Output file, normally ending in ``.nii.gz``.

    Returns
    -------
    Path
        The written file.
    """
    path = Path(path)
    mask = mask_bool(mask_img)
    values = np.asarray(values, dtype=np.float32)
    if values.ndim != 1 or values.shape[0] != int(mask.sum()):
        raise DatasetError(
            f"values for {path.name} have shape {values.shape}, mask has {int(mask.sum())} voxels"
        )
    data = np.zeros(mask.shape, dtype=np.float32)
    data[mask] = values
    header = mask_img.header.copy()
    header.set_data_dtype(np.float32)
    img = nib.Nifti1Image(data, mask_img.affine, header)
    img.header.set_slope_inter(1.0, 0.0)
    img.header["cal_min"] = 0
    img.header["cal_max"] = 0
    img.header["descrip"] = b"neuroflow score map"
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)
    return path


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "\n")


def spreadsheet_safe(text: str) -> str:
    """`text` as a TSV cell that a spreadsheet will not run as a formula (OWASP CSV injection).

    Names come from other people's datasets (ROI, channel and column names); a cell starting with
    ``= + - @`` (or a tab / line break) that is not a plain number gets a leading ``'``, which
    spreadsheets show as text. Tabs and line breaks inside are replaced by spaces so that one
    cell stays one cell.
    """
    clean = text.replace("\t", " ").replace("\r", " ").replace("\n", " ")
    if text.startswith(_FORMULA_START):
        try:
            float(text)
        except ValueError:
            return "'" + clean
    return clean


def write_target_table(columns: dict[str, np.ndarray], target_names: Sequence[str], path: str | Path) -> Path:
    """Write per-target statistics (ROIs, channels) as a tab-separated table.

    Parameters
    ----------
    columns : dict of str to ndarray
        One array of length ``len(target_names)`` per statistic, e.g. ``{"r": ..., "alpha": ...}``.
    target_names : sequence of str
        Names of the targets, written to the first column ``target``.
    path : str or Path
        Output file, normally ending in ``.tsv``.

    Returns
    -------
    Path
        The written file. NaN is written as ``n/a`` (BIDS convention).
    """
    path = Path(path)
    names = [spreadsheet_safe(str(n)) for n in target_names]
    if "target" in columns:
        raise ConfigError(f"column name 'target' is reserved in {path.name}")
    table = {"target": names}
    for name, col in columns.items():
        arr = np.asarray(col)
        if arr.ndim != 1 or arr.shape[0] != len(names):
            raise DatasetError(
                f"column {name!r} for {path.name} has shape {arr.shape}, expected ({len(names)},)"
            )
        if arr.dtype.kind in "USO":  # text read from the dataset (hemispheres, channel types, ...)
            arr = np.array([spreadsheet_safe(str(v)) for v in arr], dtype=object)
        table[spreadsheet_safe(str(name))] = arr
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(table).to_csv(path, sep="\t", index=False, na_rep="n/a")
    return path


def _save(fig: plt.Figure, png_path: str | Path) -> Path:
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(png_path, dpi=_DPI, format="png", facecolor=fig.get_facecolor())
    finally:
        plt.close(fig)
    return png_path


def render_slices_png(map_path: str | Path, png_path: str | Path, title: str, n_slices: int = 7) -> Path:
    """Axial slices of a volume score map over the MNI template (signed, symmetric colour scale)."""
    from nilearn import plotting

    img = nib.load(Path(map_path))
    data = np.nan_to_num(np.asarray(img.dataobj, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    img = nib.Nifti1Image(data, img.affine)
    vmax = float(np.max(np.abs(data))) or 1.0
    fig = plt.figure(figsize=(_FIG_WIDTH_IN, 2.4))
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning)
            plotting.plot_stat_map(img, display_mode="z", cut_coords=n_slices, figure=fig, title=title,
                                   threshold=1e-6, cmap="RdBu_r", vmin=-vmax, vmax=vmax, symmetric_cbar=True,
                                   colorbar=True, resampling_interpolation="nearest")
    except BaseException:
        plt.close(fig)
        raise
    return _save(fig, png_path)


def render_volume_png(map_path: str | Path, png_path: str | Path, title: str,
                      threshold: float | None = None) -> Path:
    """Draw a volume score map as a glass brain (signed, symmetric colour scale) PNG ~800 px wide.

    Parameters
    ----------
    map_path : str or Path
        A 3-D NIfTI map (NaN is drawn as 0).
    png_path : str or Path
        Output PNG.
    title : str
        Title drawn on the figure.
    threshold : float, optional
        Hide voxels with ``|value| < threshold``; None draws every non-zero voxel.

    Returns
    -------
    Path
        The written PNG.
    """
    from nilearn import plotting

    map_path = Path(map_path)
    if not map_path.is_file():
        raise NeuroflowError(f"score map {map_path} does not exist")
    img = nib.load(map_path)
    data = np.nan_to_num(np.asarray(img.dataobj, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    img = nib.Nifti1Image(data, img.affine)
    vmax = float(np.max(np.abs(data))) or 1.0
    fig = plt.figure(figsize=(_FIG_WIDTH_IN, 3.0))
    try:
        with warnings.catch_warnings():
            # A map with nothing above threshold is a valid (empty) picture, not a problem.
            warnings.filterwarnings("ignore", message="empty mask", category=UserWarning)
            plotting.plot_glass_brain(
                img, figure=fig, title=title, threshold=1e-6 if threshold is None else float(threshold),
                colorbar=True, plot_abs=False, cmap="RdBu_r", vmin=-vmax, vmax=vmax, symmetric_cbar=True,
                resampling_interpolation="nearest",
            )
    except BaseException:
        plt.close(fig)
        raise
    return _save(fig, png_path)


MAX_BARS = 200  # past this, one bar per target is unreadable and its cost grows with the targets
CURVE_POINTS = 2000  # points drawn of the sorted curve, whatever the number of targets
BEST_NAMED = 10


def render_targets_png(names: Sequence[str], values: np.ndarray, png_path: str | Path, title: str) -> Path:
    """Draw r per target: one bar per ROI/channel up to MAX_BARS targets (NaN: no bar), else the
    sorted-r curve with the best targets named. The cost is bounded whatever the number of targets.

    Parameters
    ----------
    names : sequence of str
        Target names (x-axis labels; thinned out when there are many).
    values : ndarray, shape (n_targets,)
        Value per target.
    png_path : str or Path
        Output PNG.
    title : str
        Figure title.

    Returns
    -------
    Path
        The written PNG.
    """
    values = np.asarray(values, dtype=float)
    if values.shape != (len(names),):
        raise DatasetError(f"values for {Path(png_path).name} have shape {values.shape}, expected ({len(names)},)")
    if len(names) > MAX_BARS:
        return _render_sorted_curve(names, values, png_path, title)
    names = [str(n)[:40] for n in names]
    fig, ax = plt.subplots(figsize=(_FIG_WIDTH_IN, 3.5))
    x = np.arange(len(names))
    colors = np.where(np.nan_to_num(values) >= 0, "tab:red", "tab:blue")
    ax.bar(x, np.nan_to_num(values), color=colors, width=0.8)
    ax.axhline(0.0, color="black", linewidth=0.8)
    step = max(1, int(np.ceil(len(names) / 40)))
    ax.set_xticks(x[::step])
    ax.set_xticklabels(names[::step], rotation=90 if len(names) > 12 else 0, fontsize=7)
    ax.set_xlim(-0.6, max(len(names), 1) - 0.4)
    ax.set_ylabel("r")
    ax.set_title(title)
    fig.tight_layout()
    return _save(fig, png_path)


def _render_sorted_curve(names: Sequence[str], values: np.ndarray, png_path: str | Path, title: str) -> Path:
    """r of every valid target, sorted from best to worst (at most CURVE_POINTS drawn), and the
    BEST_NAMED best targets listed by name."""
    valid = np.flatnonzero(np.isfinite(values))
    order = valid[np.argsort(-values[valid], kind="stable")]
    ranked = values[order]
    fig, (ax, text_ax) = plt.subplots(1, 2, figsize=(_FIG_WIDTH_IN, 3.5), gridspec_kw={"width_ratios": [3, 1]})
    if len(ranked):
        idx = np.unique(np.linspace(0, len(ranked) - 1, min(len(ranked), CURVE_POINTS)).round().astype(int))
        ax.fill_between(idx + 1, ranked[idx], 0.0, where=ranked[idx] >= 0, color="tab:red", alpha=0.6, linewidth=0)
        ax.fill_between(idx + 1, ranked[idx], 0.0, where=ranked[idx] < 0, color="tab:blue", alpha=0.6, linewidth=0)
        ax.plot(idx + 1, ranked[idx], color="black", linewidth=0.8)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xlim(1, max(len(ranked), 2))
    ax.set_xlabel(f"targets ranked by r ({len(ranked):,} valid of {len(values):,})")
    ax.set_ylabel("r")
    ax.set_title(title)
    best = [f"{i + 1:>2}. {str(names[t])[:28]}  {values[t]:.3f}" for i, t in enumerate(order[:BEST_NAMED])]
    text_ax.axis("off")
    text_ax.text(0.0, 1.0, "best targets\n" + "\n".join(best), va="top", ha="left", family="monospace",
                 fontsize=7, transform=text_ax.transAxes)
    fig.tight_layout()
    return _save(fig, png_path)


def render_histogram_png(values_by_feature: dict[str, np.ndarray], png_path: str | Path, title: str) -> Path:
    """Draw overlaid histograms of r, one per feature space (NaNs dropped).

    Parameters
    ----------
    values_by_feature : dict of str to ndarray
        Feature-space name to its per-target r values.
    png_path : str or Path
        Output PNG.
    title : str
        Figure title.

    Returns
    -------
    Path
        The written PNG.
    """
    fig, ax = plt.subplots(figsize=(_FIG_WIDTH_IN, 3.5))
    clean = {str(k): np.asarray(v, dtype=float).ravel() for k, v in values_by_feature.items()}
    clean = {k: v[np.isfinite(v)] for k, v in clean.items()}
    nonempty = {k: v for k, v in clean.items() if v.size}
    if nonempty:
        lo = min(float(v.min()) for v in nonempty.values())
        hi = max(float(v.max()) for v in nonempty.values())
        if hi <= lo:
            lo, hi = lo - 0.05, hi + 0.05
        bins = np.linspace(lo, hi, 41)
        for name, v in nonempty.items():
            ax.hist(v, bins=bins, alpha=0.5, label=f"{name} (n={v.size})")
        ax.axvline(0.0, color="black", linewidth=0.8)
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no valid values", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("r")
    ax.set_ylabel("targets")
    ax.set_title(title)
    fig.tight_layout()
    return _save(fig, png_path)


# --- surfaces and electrodes -------------------------------------------------------------

FSAVERAGE_VERTICES = {"fsaverage5": 10242, "fsaverage6": 40962, "fsaverage": 163842}


def write_surface_map(values: np.ndarray, vertices: np.ndarray, n_vertices: int, path: str | Path) -> Path:
    """Write one hemisphere's per-vertex values as a GIFTI ``.func.gii`` (NaN where not fitted).

    Parameters
    ----------
    values : ndarray, shape (n_targets,)
        One value per fitted vertex.
    vertices : ndarray of int, shape (n_targets,)
        Their vertex indices on the hemisphere's mesh.
    n_vertices : int
        Vertices of the mesh (e.g. 40962 for fsaverage6).
    """
    values = np.asarray(values, dtype=np.float32)
    vertices = np.asarray(vertices, dtype=np.int64)
    if values.shape != vertices.shape or (vertices.size and (vertices.min() < 0 or vertices.max() >= n_vertices)):
        raise DatasetError(f"{Path(path).name}: {values.shape[0]} values for vertices outside 0..{n_vertices - 1}")
    data = np.full(n_vertices, np.nan, dtype=np.float32)
    data[vertices] = values
    img = nib.gifti.GiftiImage(darrays=[nib.gifti.GiftiDataArray(
        data, intent="NIFTI_INTENT_ESTIMATE", datatype="NIFTI_TYPE_FLOAT32")])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


def surface_view_values(full: np.ndarray) -> np.ndarray | None:
    """Values on fsaverage5 (bundled with nilearn) from an fsaverage-family map, else None.

    The fsaverage meshes are nested icosahedra: the first 10,242 vertices of fsaverage6 and
    fsaverage are the vertices of fsaverage5, so the picture subsamples rather than resamples.
    """
    n = full.shape[0]
    if n not in FSAVERAGE_VERTICES.values():
        return None
    return np.asarray(full[:FSAVERAGE_VERTICES["fsaverage5"]], dtype=np.float32)


def render_surface_png(by_hemi: dict[str, np.ndarray], png_path: str | Path, title: str) -> Path | None:
    """Lateral views of both hemispheres' inflated fsaverage5 surfaces coloured by value.

    ``by_hemi`` maps ``"L"``/``"R"`` to full-length per-vertex arrays (NaN: not fitted). Returns
    None when the maps are not on an fsaverage mesh (no picture; the GIFTI maps remain).
    """
    from nilearn import datasets, plotting

    views = {h: surface_view_values(v) for h, v in by_hemi.items()}
    if not views or any(v is None for v in views.values()):
        return None
    mesh = datasets.load_fsaverage("fsaverage5")
    finite = np.concatenate([v[np.isfinite(v)] for v in views.values()])
    vmax = float(np.nanmax(np.abs(finite))) if finite.size else 1.0
    hemis = [h for h in ("L", "R") if h in views]
    fig, axes = plt.subplots(1, len(hemis), figsize=(4.2 * len(hemis), 3.4), subplot_kw={"projection": "3d"})
    axes = np.atleast_1d(axes)
    for ax, h in zip(axes, hemis):
        part = "left" if h == "L" else "right"
        plotting.plot_surf_stat_map(mesh["inflated"].parts[part], np.nan_to_num(views[h]), hemi=part,
                                    view="lateral", colorbar=h == hemis[-1], vmax=vmax or 1.0, axes=ax,
                                    figure=fig, bg_map=None)
        ax.set_title(f"{'left' if h == 'L' else 'right'} hemisphere", fontsize=9)
    fig.suptitle(title, fontsize=10)
    return _save(fig, png_path)


def render_electrodes_png(values: np.ndarray, coords: np.ndarray, png_path: str | Path, title: str) -> Path | None:
    """Electrodes drawn at their (MNI) coordinates on a glass brain, coloured by value.

    Electrodes without coordinates (NaN) are left out; None when none has any.
    """
    from nilearn import plotting

    coords = np.asarray(coords, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    keep = np.isfinite(coords).all(axis=1) & np.isfinite(values)
    if not keep.any():
        return None
    vmax = float(np.max(np.abs(values[keep]))) or 1.0
    fig = plt.figure(figsize=(8, 3.2))
    plotting.plot_markers(values[keep], coords[keep], node_cmap="RdBu_r", node_vmin=-vmax, node_vmax=vmax,
                          node_size=18, display_mode="lzry", title=title, figure=fig)
    return _save(fig, png_path)


def render_decoding_png(by_feature: dict[str, dict], png_path: str | Path, title: str) -> Path:
    """Identification accuracy of each feature space's decoder: top-1 and top-5 against chance.

    ``by_feature`` maps a feature space to its decoding summary (``top1``, ``top5``,
    ``chance_top1``, ``chance_top5``, ``n_segments``).
    """
    names = sorted(by_feature)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(_FIG_WIDTH_IN, 3.2))
    for offset, key, color in ((-0.2, "top1", "#3b6ea8"), (0.2, "top5", "#9bbbe0")):
        values = [by_feature[n][key] for n in names]
        ax.bar(x + offset, values, width=0.38, color=color, label=f"{key} identification")
        for xi, n in zip(x, names):
            ax.hlines(by_feature[n][f"chance_{key}"], xi + offset - 0.19, xi + offset + 0.19, colors="black",
                      linestyles="dashed", linewidth=1)
    ax.set_xticks(x, [f"{n}\n({by_feature[n]['n_segments']} segments)" for n in names], fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("fraction of held-out segments")
    ax.set_title(title + " (dashed: chance)", fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    return _save(fig, png_path)


def sensor_plane(xyz: np.ndarray) -> np.ndarray:
    """2-D positions of sensors on a helmet: azimuthal equidistant projection from its top (as MNE draws)."""
    xyz = np.asarray(xyz, dtype=np.float64)
    centred = xyz - np.array([xyz[:, 0].mean(), xyz[:, 1].mean(), xyz[:, 2].min()])
    r = np.linalg.norm(centred, axis=1)
    theta = np.arccos(np.clip(centred[:, 2] / np.where(r > 0, r, 1.0), -1.0, 1.0))
    phi = np.arctan2(centred[:, 1], centred[:, 0])
    return np.stack([theta * np.cos(phi), theta * np.sin(phi)], axis=1)


def render_topomaps_png(weights: np.ndarray, xyz: np.ndarray, lag_times: np.ndarray, png_path: str | Path,
                        title: str) -> Path:
    """One sensor topomap (MNE) per TRF lag of the encoding weights' norm, on one colour scale."""
    import mne

    weights = np.asarray(weights, dtype=np.float64)
    pos = sensor_plane(xyz)
    radius = float(np.abs(pos).max()) * 1.08 or 1.0
    vmax = float(np.nanmax(weights)) if np.isfinite(weights).any() else 1.0
    n = weights.shape[0]
    fig, axes = plt.subplots(1, n, figsize=(min(_FIG_WIDTH_IN * 1.5, 1.6 * n), 2.0))
    axes = np.atleast_1d(axes)
    for ax, w, t in zip(axes, weights, lag_times):
        mne.viz.plot_topomap(np.nan_to_num(w), pos, axes=ax, show=False, vlim=(0.0, vmax or 1.0), cmap="Reds",
                             sphere=np.array([0.0, 0.0, 0.0, radius]), contours=0, sensors=False)
        ax.set_title(f"{t * 1000:+.0f} ms", fontsize=8)
    fig.suptitle(title, fontsize=9)
    return _save(fig, png_path)
