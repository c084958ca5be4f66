"""The converter behind frozen_tfrecord.py: video-text corpora -> the TFRecord frame store pre-training reads.

items.py (what is converted: clips, the sources they come from, failures), tables.py (WebVid csv, Panda-70M,
InternVid and other tables), sources.py (video folders, captions beside the videos, frame folders, tables -> what
to convert), webdataset_input.py (tar shards, local or s3://, streamed), decoders.py (the one frame-selection rule;
OpenCV, PyAV and frame-folder decoders), encoding.py (record payloads), shards.py (planning, writing, verifying,
resuming, assembling and merging shards), convert.py (a conversion, or one part of it).
"""
