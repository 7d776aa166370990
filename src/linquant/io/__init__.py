"""On-disk formats, checkpoint reading and atomic writes."""
