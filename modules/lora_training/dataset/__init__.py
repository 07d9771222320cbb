"""Dataset preparation: scan → validate → crop to buckets → caption → trigger word."""
