"""Benchmarks users choose tools by: `mtpkit bench` (runner, methods, report), `mtpkit predict` (predict)
and `mtpkit profile-device` (device). Results are JSON documents laid out as docs/bench.md describes."""
