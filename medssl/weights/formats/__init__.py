"""One small reader per published checkpoint format (see docs/checkpoints.md); each returns a
:class:`medssl.weights.formats.common.ReaderOutput` in medssl names."""
