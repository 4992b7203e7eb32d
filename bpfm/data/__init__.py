"""PulseDB data: reading (`pulsedb`), synthetic releases (`synth`), shards, splits and loaders."""
