"""``tuneforge ui``: a web dashboard over a folder of runs (watch, compare, launch, chat).

runs.py reads run folders (status, curves, config, summary, report); jobs.py starts and stops
``tuneforge`` processes; app.py is the FastAPI app and its safety checks; static/ is the page
(plain JavaScript and CSS, written here, no third-party code).
"""
