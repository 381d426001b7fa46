"""nadray: network anomaly detection on Ray.

Per-host LSTMs over Zeek, flow-export and pcap archives, trained with Ray Train,
tuned with Ray Tune, served with Ray Serve and retrained nightly. Importing the
package does no work: every stage lives in its own module and is imported on use.
"""

__version__ = "0.1.0"
