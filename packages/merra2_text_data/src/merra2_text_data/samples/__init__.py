"""From a regional cube to samples: the plan (windows x tiles), splits, arrays and statistics, normalisation,
climatology, event reports, captions and the per-sample validation."""
