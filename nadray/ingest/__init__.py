"""Ingest: raw traffic files into canonical flow tables and the Parquet archive.

``read_input(path)`` parses one input (no writes); ``ingest(inputs, archive)``
reads files and folders (local or ``s3://``, ``.gz`` transparently), writes good
records to the archive and bad ones to the quarantine, and reports counts that add
up: ``read == archived + quarantined + skipped``. One adapter module per format:
``zeek``, ``argus``, ``cicflowmeter``, ``unsw``, ``cs448b``, ``pcap``; ``detect``
recognises them from content. Field and label mappings: docs/INGEST.md.
"""

from nadray.ingest.common import ReadResult
from nadray.ingest.core import FileReport, IngestReport, ingest, read_input

__all__ = ["FileReport", "IngestReport", "ReadResult", "ingest", "read_input"]
