"""Where the climate fields come from: MERRA-2 granules (found in a folder, at an fsspec URL or through NASA CMR,
downloaded, checked, subset into one regional hourly cube), ERA5 zarr stores, and synthetic MERRA-2 files."""
