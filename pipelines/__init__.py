"""neuroflow: encoding and decoding models from public brain recordings.

Every stage is a plain function importable from this package; nothing here imports Airflow.
"""
__version__ = "0.1.0"
