"""MEG, EEG and iEEG (ECoG/sEEG) recordings through MNE-Python and MNE-BIDS.

A raw BIDS recording (``sub-*/[ses-*/]meg|ieeg|eeg/*_<meg|ieeg|eeg>.<ext>``) is read with
``mne_bids.read_raw_bids``: channel types and units come from ``channels.tsv``, bad channels
from its ``status`` column, and the reader of the vendor format (KIT ``.con`` with its marker
and head-shape files, EDF, BrainVision, FIF, ...) is chosen by MNE. A derivative (e.g. the
Podcast dataset's ``desc-highgamma_ieeg.fif``) is read with ``mne.io.read_raw``; its bad channels
come from the raw recording's ``channels.tsv`` handed in as ``channels_tsv``.

Then, in this order: bad channels (``channels.tsv`` and ``bad_channels``) dropped, data channels
of the kind picked (MEG: magnetometers/gradiometers without the reference sensors; iEEG: ECoG,
sEEG, DBS), optional notch and band-pass filters, optional high-gamma envelope (band-pass then
the magnitude of the analytic signal), and resampling to ``sfreq`` (MNE's resampling low-passes
first). Sample k of the result lies at ``k / sfreq`` seconds from the recording's first sample,
the clock of BIDS ``events.tsv`` onsets.
"""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import DatasetError
from ..limits import check_allocation, check_table
from . import Responses, as_float32, check_not_pointer

PICKS = {"meg": dict(meg=True, ref_meg=False), "eeg": dict(eeg=True), "ieeg": dict(ecog=True, seeg=True, dbs=True)}


def read_channels_tsv(path: str | Path, key: str) -> pd.DataFrame:
    """A BIDS ``channels.tsv`` (a UTF-8 BOM, as in ds005574's, is accepted)."""
    check_not_pointer(path, key)
    check_table(path, key, "channels.tsv")
    try:
        table = pd.read_csv(path, sep="\t", encoding="utf-8-sig", na_values=["n/a"], keep_default_na=False,
                            dtype={"name": str})
    except Exception as err:  # noqa: BLE001
        raise DatasetError(f"{key}: unreadable channels.tsv ({err})") from err
    if "name" not in table.columns:
        raise DatasetError(f"{key}: channels.tsv has no 'name' column (columns: {list(table.columns)})")
    return table


def _quiet():
    """Silence MNE's console chatter (warnings about sidecars stay warnings)."""
    return contextlib.redirect_stdout(io.StringIO())


def _open_raw(path: Path, key: str, bids_root: str | Path | None):
    import mne

    try:
        if bids_root is not None:
            import mne_bids

            bids_path = mne_bids.get_bids_path_from_fname(path)
            bids_path.update(root=Path(bids_root))
            with _quiet():
                return mne_bids.read_raw_bids(bids_path, verbose="error"), "mne_bids.read_raw_bids"
        with _quiet():
            return mne.io.read_raw(path, preload=False, verbose="error"), "mne.io.read_raw"
    except DatasetError:
        raise
    except Exception as err:  # noqa: BLE001 - vendor readers raise anything on a damaged file
        raise DatasetError(f"{key}: MNE cannot read this recording ({type(err).__name__}: {err}); "
                           "the file is truncated, damaged or not the format its name says") from err


def read_mne_raw(path: str | Path, key: str, *, kind: str = "ieeg", bids_root: str | Path | None = None,
                 channels_tsv: str | Path | None = None, channels_key: str | None = None,
                 bad_channels: tuple[str, ...] | list[str] = (), channel_types: tuple[str, ...] | None = None,
                 l_freq: float | None = None, h_freq: float | None = None, notch: float | None = None,
                 high_gamma: tuple[float, float] | None = None, sfreq: float | None = None,
                 electrodes: pd.DataFrame | None = None) -> Responses:
    """Read, clean and resample one MEG/EEG/iEEG recording.

    Parameters
    ----------
    path, key : the local file and its dataset key (named in errors).
    kind : ``meg``, ``ieeg`` or ``eeg``: which channels are targets.
    bids_root : the local BIDS root `path` lies in; given, the file is read with MNE-BIDS
        (``channels.tsv`` types and statuses applied). None for derivative files.
    channels_tsv : a ``channels.tsv`` whose ``status == bad`` rows are dropped (for derivatives).
    bad_channels : more channels to drop (names must exist).
    channel_types : MNE channel types to keep instead of the kind's default.
    l_freq, h_freq : band-pass edges in Hz (None: that side unfiltered).
    notch : line frequency in Hz; it and its harmonics below Nyquist are notched out.
    high_gamma : ``(low, high)`` Hz: the output is the envelope (analytic amplitude) of that band.
    sfreq : resample to this rate (Hz) at the end.
    electrodes : a BIDS ``electrodes.tsv`` table (name, x, y, z, ...) joined onto the targets.

    Returns
    -------
    Responses with data [n_samples, n_channels] (float32, SI units), period ``1 / sfreq``.
    """
    import mne

    path = Path(path)
    if path.is_file():
        check_not_pointer(path, key)
    if kind not in PICKS:
        raise ValueError(f"'kind' must be one of {sorted(PICKS)}; got {kind!r}")
    raw, how = _open_raw(path, key, bids_root)
    sfreq_file = float(raw.info["sfreq"])
    n_file = int(raw.n_times)
    bads = set(raw.info["bads"])
    if channels_tsv is not None:
        table = read_channels_tsv(channels_tsv, channels_key or str(channels_tsv))
        if "status" in table.columns:
            listed_bad = set(table.loc[table["status"].astype(str).str.lower() == "bad", "name"])
            bads |= listed_bad & set(raw.ch_names)
    unknown = [c for c in bad_channels if c not in raw.ch_names]
    if unknown:
        raise DatasetError(f"{key}: 'bad_channels' names channels the recording does not have: {unknown}; "
                           f"it has {raw.ch_names[:10]}{' ...' if len(raw.ch_names) > 10 else ''}")
    bads |= set(bad_channels)
    raw.info["bads"] = sorted(bads & set(raw.ch_names))
    if channel_types:
        picks = mne.pick_types(raw.info, exclude="bads", **{t: True for t in channel_types})
    else:
        picks = mne.pick_types(raw.info, exclude="bads", **PICKS[kind])
    if len(picks) == 0:
        types = sorted(set(raw.get_channel_types()))
        raise DatasetError(f"{key}: no good {kind} channel left (channel types: {types}; {len(bads)} bad); "
                           "check 'dataset.responses.kind', the channels.tsv types and 'bad_channels'")
    # the float64 samples of the picked channels, and the float32 copy handed back
    check_allocation(len(picks) * n_file * (8 + 4), key, f"{len(picks)} channels x {n_file} samples")
    with _quiet():
        raw.pick(picks)
        raw.load_data(verbose="error")
        nyquist = sfreq_file / 2
        if notch:
            freqs = np.arange(notch, nyquist, notch)
            if len(freqs):
                raw.notch_filter(freqs, verbose="error")
        if l_freq is not None or h_freq is not None:
            raw.filter(l_freq, h_freq if h_freq is None or h_freq < nyquist else None, verbose="error")
        if high_gamma is not None:
            lo, hi = (float(x) for x in high_gamma)
            if not 0 < lo < hi:
                raise DatasetError(f"'high_gamma' must be (low, high) Hz with 0 < low < high; got {high_gamma}")
            if hi >= nyquist:
                raise DatasetError(f"{key}: sampled at {sfreq_file:g} Hz, too slow for a {lo:g}-{hi:g} Hz "
                                   f"envelope (Nyquist {nyquist:g} Hz); lower 'high_gamma' or use the raw recording")
            raw.filter(lo, hi, verbose="error")
            raw.apply_hilbert(envelope=True, verbose="error")
        if sfreq and abs(float(sfreq) - sfreq_file) > 1e-9:
            raw.resample(float(sfreq), verbose="error")
    data = as_float32(raw.get_data().T, key)
    if not np.isfinite(data).all():
        bad = [raw.ch_names[i] for i in np.where(~np.isfinite(data).all(axis=0))[0][:10]]
        raise DatasetError(f"{key}: NaN or Inf samples in channels {bad}; mark them bad in channels.tsv "
                           "or list them in 'bad_channels'")
    names = list(raw.ch_names)
    info = pd.DataFrame({"name": names, "type": raw.get_channel_types()})
    if electrodes is None and raw.get_channel_types() and set(raw.get_channel_types()) <= {"mag", "grad", "eeg"}:
        # MEG / EEG sensor positions (device or head frame, metres), for topographic maps
        loc = np.array([ch["loc"][:3] for ch in raw.info["chs"]], dtype=np.float64)
        if np.isfinite(loc).all() and (np.abs(loc).sum(axis=1) > 0).all():
            info["x"], info["y"], info["z"] = loc[:, 0], loc[:, 1], loc[:, 2]
            info["coordinates"] = "sensor"
    if electrodes is not None and "name" in electrodes.columns:
        info = info.merge(electrodes.drop_duplicates("name"), on="name", how="left", suffixes=("", "_electrode"))
    return Responses(data=data, period=1.0 / float(raw.info["sfreq"]), target_names=names, target_info=info,
                     meta={"reader": how, "sfreq_file": sfreq_file, "n_samples_file": n_file,
                           "duration_file": n_file / sfreq_file, "sfreq": float(raw.info["sfreq"]),
                           "bad_channels": sorted(bads), "high_gamma": list(high_gamma) if high_gamma else None})
