"""bpfm: CEReBrO, an EEG foundation model, fine-tuned and quantized for blood pressure."""

from bpfm.io.redact import redact_bpfm_logs

__version__ = "0.1.0"

redact_bpfm_logs()  # before any bpfm module logs a URI, in whatever process imports bpfm
