"""bpfm: CEReBrO, an EEG foundation model, fine-tuned and quantized for blood pressure."""

__version__ = "0.1.0"
