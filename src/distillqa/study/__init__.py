"""A human study of explanation quality: create (design.py), serve (app.py on store.py), analyze
(analysis.py, report.py). Needs the `study` extra: pip install -e ".[study]"."""
