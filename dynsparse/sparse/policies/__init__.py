"""One small file per policy; each overrides only the steps of the drop-and-grow base that differ."""
