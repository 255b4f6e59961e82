"""Captioning images at scale: the job behind caption_images.py (``job.run``), its outputs (``outputs``: part files,
resume, merge, failed.jsonl, summary.json, parquet, sidecars) and best-of-N re-ranking by CLIP-S (``rerank``).

The inputs (folders, globs, lists, webdataset shards, parquet) are read by ``data.image_inputs``; the captions come
from ``models.Captioner``. Importing this package loads nothing heavy: import ``captioning.job`` to run a job.
"""
