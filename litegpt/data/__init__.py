"""Raw data -> shards: CSV readers, rater policy, DICOM conversion, the shard format, prepare, synth, inspection.

Imports only the shared vocabulary (labels, grammar, boxes); never the model.
"""
