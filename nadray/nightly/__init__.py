"""The nightly pipeline's parts; the pipeline itself is ``nadray.retrain.retrain``.

- ``staging``: landing scan (content hashes), staging archive, window reads, commit.
- ``compare``: the comparison split, challenger training, champion scoring, decision, drift.
- ``report``: ``night.json`` and ``report.html`` under ``<registry>/<name>/nights/<date>/``.
- ``demo``: ``jobs/nightly_retrain.py --demo`` on the bundled data.
"""
