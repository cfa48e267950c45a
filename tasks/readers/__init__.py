"""Readers of what extract reads: compressed streams and their safety checks (streams.py), the checked
streaming tar walker (tar.py), a downloaded file cut into cacheable units (units.py), document files
(documents.py, warc.py), Parquet shard writing (shards.py), and the one entry point that turns a download
into a version's document shards, unit by unit (corpus.py)."""

from tasks.readers.corpus import CorpusSummary, ReadOptions, extract_corpus, quarantine_message

__all__ = ["CorpusSummary", "ReadOptions", "extract_corpus", "quarantine_message"]
