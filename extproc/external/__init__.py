"""The external stage protocol: the wire conversions and the author's kit for out-of-process stages."""
