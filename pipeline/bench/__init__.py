"""The `make bench-*` programs and the demo builder; nothing in the pipeline imports them."""
