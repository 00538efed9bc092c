"""SavedModel + serving signatures, TFLite/LiteRT conversion, parity checks."""
