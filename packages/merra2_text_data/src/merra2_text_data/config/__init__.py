"""The build configuration: `BuildConfig` (build.py) composed of one section per concern (sections.py), and the
durations of windows and time steps (durations.py)."""
