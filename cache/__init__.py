"""The HDF5 feature cache: format, writer, reader and fingerprints."""
